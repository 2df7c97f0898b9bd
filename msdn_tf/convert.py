"""``python -m msdn_tf.convert``: the command lives in :mod:`msdn_tf.cli.convert`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("convert")
