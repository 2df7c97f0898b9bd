"""``python -m msdn_tf.evaluate``: the command lives in :mod:`msdn_tf.cli.evaluate`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("evaluate")
