"""``python -m msdn_tf.extract``: the command lives in :mod:`msdn_tf.cli.extract`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("extract")
