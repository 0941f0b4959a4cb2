"""`encode --cluster`: the corpus encode on Dask distributed, one machine (a LocalCluster) or many (a
scheduler's address), written as .npy shards plus a manifest (engine/embeddings.py).

    plan.py   the input cut into line-aligned byte ranges of N lines (one scan, on a worker)
    work.py   on each worker: the model loaded once (a worker plugin), one task per partition
    run.py    on the client: connect, load, plan, run, progress, manifest, summary

Dask is imported only by work.py and inside run.py's functions: `import engine` works without it.
"""
