"""Building the dataset, in pipeline order.

catalog (the release's sub-datasets) -> slides (one reader per slide backend, the nested grid) and
tissue (which tiles to keep) -> roi (ROI images) -> slidefiles (the files of one slide) and units
(per-source work, cached) -> shards (Parquet) -> mini (CPIA-Mini selection) -> card (the dataset card)
and coverage (built vs the release's counts) -> convert (the whole run; executor runs its jobs in
worker processes, outlock keeps one run per output folder).
`cli` holds `cpia convert` and `cpia push`.
"""
