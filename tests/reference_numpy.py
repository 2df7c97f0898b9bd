"""An independent NumPy (float64) implementation of the reference equations (docs/reference.md §3-§5).

Written from the note, channel-first like the reference (Fs is (B, F, R)), so
that it shares no code with the Keras model it checks.
"""

import numpy as np


def normalize(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def forward(fmap_bfr, V, W_1, W_2, W_1_1, W_2_1, att, bias=0.0, mask_bias=None, normalize_V=False):
    """§3 with Fs (B, F, R). Returns S1, S2 (B, C) and the two attention maps (B, K, R)."""
    Fs = normalize(np.asarray(fmap_bfr, np.float64), axis=1)
    V_n = normalize(V, axis=1) if normalize_V else V
    margin = 0.0 if mask_bias is None else bias * mask_bias
    S = np.einsum("iv,vf,bfr->bir", V_n, W_1, Fs)
    A = softmax(np.einsum("iv,vf,bfr->bir", V_n, W_2, Fs), axis=2)
    psi = np.sum(A * S, axis=2)
    S1 = np.einsum("ki,bi->bk", att, psi) + margin
    T = np.einsum("bfr,fv,iv->bri", Fs, W_1_1, V_n)
    Bw = softmax(np.einsum("iv,vf,bfr->bir", V_n, W_2_1, Fs), axis=1)
    phi = np.einsum("bir,bri->bi", Bw, T)
    S2 = np.einsum("ki,bi->bk", att, phi) + margin
    F_p = np.einsum("bir,bfr->bif", A, Fs)
    u = np.einsum("bir,iv->brv", Bw, V_n)
    return {"S1": S1, "S2": S2, "A": A, "Bw": Bw, "psi": psi, "phi": phi, "F_p": F_p, "u": u}


def log_softmax(S):
    m = S.max(axis=1, keepdims=True)
    return S - m - np.log(np.exp(S - m).sum(axis=1, keepdims=True))


def ce(S, y, classes=None):
    if classes is not None:
        S = np.where(np.isin(np.arange(S.shape[1]), classes), S, -np.inf)
    return float(np.mean(-log_softmax(S)[np.arange(len(y)), y]))


def cal(S, unseen):
    p = np.exp(log_softmax(S))
    return float(-np.log(np.mean(p[:, unseen].sum(axis=1))))


def cal_paper(S, unseen):
    ind = -np.ones(S.shape[1])
    ind[unseen] = 1.0
    return float(np.mean(-log_softmax(S + ind)[:, unseen].sum(axis=1)))


def jsd(S1, S2):
    p, q = np.exp(log_softmax(S1)), np.exp(log_softmax(S2))
    m = (p + q) / 2
    kl = lambda a, b: np.mean(np.sum(a * np.log(a / b), axis=1))
    return float(0.5 * (kl(q, m) + kl(p, m)))


def logit_term(S1, S2):
    d = S1 - S2
    return float(np.mean(np.sum(np.abs(d) ** 3, axis=1) / np.linalg.norm(d, axis=1)))


def sq_l2(S1, S2):
    return float(np.mean(np.sum((S1 - S2) ** 2, axis=1)))


def total_loss(S1, S2, y, unseen, lam, wd, margin=0.0):
    """§4 on logits S1, S2 that INCLUDE the margin: only the cross-entropy removes it."""
    return (
        ce(S1 - margin, y)
        + lam * cal(S1, unseen)
        + ce(S2 - margin, y)
        + lam * cal(S2, unseen)
        + wd * (jsd(S1, S2) + logit_term(S1, S2))
    )


def torch_rmsprop_step(w, g, state, lr=1e-4, alpha=0.99, eps=1e-8, momentum=0.9, weight_decay=1e-4):
    """One torch.optim.RMSprop step (centered=False), as the PyTorch docs state it."""
    g = g + weight_decay * w
    state["v"] = alpha * state.get("v", 0.0) + (1 - alpha) * g * g
    avg = np.sqrt(state["v"]) + eps
    if momentum > 0:
        state["buf"] = momentum * state.get("buf", 0.0) + g / avg
        return w - lr * state["buf"]
    return w - lr * g / avg
