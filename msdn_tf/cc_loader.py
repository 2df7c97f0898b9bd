"""``python -m msdn_tf.cc_loader``: the command lives in :mod:`msdn_tf.cli.cc_loader`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("cc_loader")
