"""Check an untrusted pickle's shape before anything is unpickled (no object is built).

:func:`scan_pickle` walks the opcodes of a pickle with :func:`pickletools.genops` and
tracks an abstract stack: for every value only its kind (a string, a list, a dict, ...)
and its nesting depth, never the value. It refuses, before a single object exists,
what would make unpickling or anything done afterwards take unbounded time or memory:

* nesting deeper than ``max_depth`` (a 1.7 KB pickle of nested tuples, each holding the
  previous one twice, is a key whose hash or repr takes longer than the universe);
* a memo index beyond the number of opcodes read so far (``LONG_BINPUT 0x0fffffff``,
  ten bytes, makes CPython's unpickler allocate and clear a 4 GiB memo table);
* a dict key that is not a string (keys are hashed while unpickling: tuples of shared
  tuples hash in exponential time, integers can be chosen to collide); sets and
  frozensets (hashed the same way; a state_dict has none);
* a container modified after it was placed inside another object (only crafted or
  self-referencing pickles do that; it is what would let nesting grow unseen);
* out-of-band buffers (pickle protocol 5), and malformed or truncated opcode streams.

It does not judge which globals a pickle names: the caller's ``find_class`` does that.
The scan is linear in the pickle's length (about 1 s per MB of pickle on a loaded
2-core machine; a state_dict's ``data.pkl`` is tens of KB).

Example:
    >>> import pickle
    >>> scan_pickle(pickle.dumps({"a": [1, 2]}, protocol=2), max_depth=8)
    >>> nested = pickle.dumps([[[[1]]]], protocol=2)
    >>> scan_pickle(nested, max_depth=3)
    Traceback (most recent call last):
    ...
    msdn_tf.interop.pickle_scan.PickleRefused: byte 18: objects nested deeper than 3 levels
"""

from __future__ import annotations

import pickletools
from typing import List

__all__ = ["PickleRefused", "scan_pickle"]

_STR = frozenset(["STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"])
_ATOM = frozenset(
    [
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "FLOAT",
        "BINFLOAT",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
    ]
)
_IGNORED = frozenset(["PROTO", "FRAME", "STOP"])
_SETS = frozenset(["EMPTY_SET", "ADDITEMS", "FROZENSET"])
_MUTABLE = frozenset(["list", "dict", "obj"])


class PickleRefused(Exception):
    """The pickle breaks one of the limits of :func:`scan_pickle`; the message says which."""


class _Value:
    """What the scan knows about one stack value: its kind and nesting depth."""

    __slots__ = ("kind", "depth", "nested")

    def __init__(self, kind: str, depth: int = 1):
        self.kind = kind
        self.depth = depth
        self.nested = False  # placed inside another object


_MARK = object()


def scan_pickle(data: bytes, max_depth: int = 64) -> None:
    """Refuse ``data`` (a pickle) if it breaks a limit; return ``None`` if it does not.

    Args:
        data: the whole pickle, as bytes.
        max_depth: deepest nesting of containers allowed (a scalar is depth 1, a list of
            scalars 2, ...).

    Raises:
        PickleRefused: the message starts with the byte offset of the opcode at fault.
    """
    stack: List[object] = []
    memo = {}
    count = 0

    def fail(pos, text):
        raise PickleRefused("byte %d: %s" % (pos, text))

    def pop(pos):
        if not stack or stack[-1] is _MARK:
            fail(pos, "malformed pickle (stack underflow)")
        return stack.pop()

    def pop_mark(pos):
        items = []
        while stack and stack[-1] is not _MARK:
            items.append(stack.pop())
        if not stack:
            fail(pos, "malformed pickle (no mark)")
        stack.pop()
        items.reverse()
        return items

    def nest(pos, kind, children):
        depth = 1
        for child in children:
            if child.depth + 1 > depth:
                depth = child.depth + 1
            child.nested = True
        if depth > max_depth:
            fail(pos, "objects nested deeper than %d levels" % max_depth)
        return _Value(kind, depth)

    def mutate(pos, target, children):
        if target.kind not in _MUTABLE:
            fail(pos, "malformed pickle (items added to a %s)" % target.kind)
        if target.nested:
            fail(pos, "an object is modified after it was placed inside another one (a crafted pickle)")
        for child in children:
            if child is target:
                fail(pos, "an object contains itself (a crafted pickle)")
        grown = nest(pos, target.kind, children)
        target.depth = max(target.depth, grown.depth)

    def check_keys(pos, keys):
        for key in keys:
            if key.kind != "str":
                fail(pos, "a dict key is a %s, not a string (a state_dict's keys are strings)" % key.kind)

    def top(pos):
        if not stack or stack[-1] is _MARK:
            fail(pos, "malformed pickle (stack underflow)")
        return stack[-1]

    try:
        for opcode, arg, pos in pickletools.genops(data):
            count += 1
            name = opcode.name
            if name in _STR:
                stack.append(_Value("str"))
            elif name in _ATOM:
                stack.append(_Value("atom"))
            elif name in _IGNORED:
                continue
            elif name in _SETS:
                fail(pos, "sets are not allowed (a state_dict has none)")
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID"):
                stack.append(_Value("obj"))
            elif name == "STACK_GLOBAL":
                pop(pos), pop(pos)
                stack.append(_Value("obj"))
            elif name == "BINPERSID":
                stack.append(nest(pos, "obj", [pop(pos)]))
            elif name == "EMPTY_LIST":
                stack.append(_Value("list"))
            elif name == "EMPTY_DICT":
                stack.append(_Value("dict"))
            elif name == "EMPTY_TUPLE":
                stack.append(_Value("tuple"))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop(pos) for _ in range(n)][::-1]
                stack.append(nest(pos, "tuple", items))
            elif name == "TUPLE":
                stack.append(nest(pos, "tuple", pop_mark(pos)))
            elif name == "LIST":
                stack.append(nest(pos, "list", pop_mark(pos)))
            elif name == "DICT":
                items = pop_mark(pos)
                if len(items) % 2:
                    fail(pos, "malformed pickle (odd number of dict items)")
                check_keys(pos, items[0::2])
                stack.append(nest(pos, "dict", items))
            elif name == "APPEND":
                value = pop(pos)
                mutate(pos, top(pos), [value])
            elif name == "APPENDS":
                items = pop_mark(pos)
                mutate(pos, top(pos), items)
            elif name == "SETITEM":
                value = pop(pos)
                key = pop(pos)
                check_keys(pos, [key])
                mutate(pos, top(pos), [key, value])
            elif name == "SETITEMS":
                items = pop_mark(pos)
                if len(items) % 2:
                    fail(pos, "malformed pickle (odd number of dict items)")
                check_keys(pos, items[0::2])
                mutate(pos, top(pos), items)
            elif name == "BUILD":
                state = pop(pos)
                mutate(pos, top(pos), [state])
            elif name == "REDUCE":
                args = pop(pos)
                func = pop(pos)
                stack.append(nest(pos, "obj", [func, args]))
            elif name == "NEWOBJ":
                args = pop(pos)
                cls = pop(pos)
                stack.append(nest(pos, "obj", [cls, args]))
            elif name == "NEWOBJ_EX":
                kwargs, args, cls = pop(pos), pop(pos), pop(pos)
                stack.append(nest(pos, "obj", [cls, args, kwargs]))
            elif name in ("OBJ", "INST"):
                stack.append(nest(pos, "obj", pop_mark(pos)))
            elif name == "POP":
                if stack and stack[-1] is _MARK:
                    stack.pop()
                else:
                    pop(pos)
            elif name == "POP_MARK":
                pop_mark(pos)
            elif name == "DUP":
                stack.append(top(pos))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else int(arg)
                if index < 0 or index > count:
                    fail(pos, "memo index %d is larger than the pickle could need (%d opcodes so far)" % (index, count))
                memo[index] = top(pos)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                index = int(arg)
                if index not in memo:
                    fail(pos, "malformed pickle (memo index %d was never set)" % index)
                stack.append(memo[index])
            else:  # NEXT_BUFFER, READONLY_BUFFER and any opcode of a future protocol
                fail(pos, "opcode %s is not allowed" % name)
    except ValueError as exc:  # genops: truncated stream, unknown opcode, bad argument
        text = str(exc)
        raise PickleRefused("malformed pickle (%s)" % (text[:200] + ("..." if len(text) > 200 else ""))) from None
    if count == 0:
        raise PickleRefused("byte 0: empty pickle")
    if len(stack) != 1 or stack[0] is _MARK:
        raise PickleRefused("byte %d: malformed pickle (%d values left at STOP)" % (len(data), len(stack)))
