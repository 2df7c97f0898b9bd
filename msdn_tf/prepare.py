"""``python -m msdn_tf.prepare``: the command lives in :mod:`msdn_tf.cli.prepare`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("prepare")
