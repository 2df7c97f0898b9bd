"""``python -m msdn_tf.held_out``: the command lives in :mod:`msdn_tf.cli.held_out`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("held_out")
