"""``python -m msdn_tf.ablations``: the command lives in :mod:`msdn_tf.cli.ablations`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("ablations")
