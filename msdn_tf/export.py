"""``python -m msdn_tf.export``: the command lives in :mod:`msdn_tf.cli.export`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("export")
