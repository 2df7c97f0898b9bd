"""``python -m msdn_tf.serve_local``: the command lives in :mod:`msdn_tf.cli.serve_local`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("serve_local")
