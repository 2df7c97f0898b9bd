"""``python -m msdn_tf.verify_backbone``: the command lives in :mod:`msdn_tf.cli.verify_backbone`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("verify_backbone")
