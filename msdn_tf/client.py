"""``python -m msdn_tf.client``: the command lives in :mod:`msdn_tf.cli.client`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("client")
