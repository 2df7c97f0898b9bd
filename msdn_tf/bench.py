"""``python -m msdn_tf.bench``: the command lives in :mod:`msdn_tf.cli.bench`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("bench")
