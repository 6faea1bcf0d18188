"""What a run writes and reads back; imports nothing from the engine or the run.

    checkpoint     orbax checkpoints of the device and host state (fingerprints:
                   what a restored checkpoint is checked against)
    metrics        metrics.jsonl, TensorBoard scalars, non-blocking fetches
    plots          perplexity, attention heat maps, methods compared, learning curves,
                   a sweep (matplotlib)
    report         runs compared: tables (seed groups, differing config fields),
                   learning curves, a sweep plot, warnings

Nothing is imported here, so reading metrics does not load matplotlib or orbax.
The modules' documented functions (metrics.read_metrics, plots.plot_methods,
report.write_report) are stable; their other names are not.
"""
