"""``python -m msdn_tf.protocols``: the command lives in :mod:`msdn_tf.cli.protocols`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("protocols")
