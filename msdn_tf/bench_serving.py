"""``python -m msdn_tf.bench_serving``: the command lives in :mod:`msdn_tf.cli.bench_serving`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("bench_serving")
