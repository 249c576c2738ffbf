"""CPIA on the Hugging Face Hub: conversion, loading, pre-training and evaluation.

One subpackage per stage, data flowing down: `dataset` (sources -> Parquet shards -> card), `model`
(backbone, export, model card), `train` (pre-training), `evaluate` (downstream protocols) and
`demo`. At the top only what every stage shares: `cli` (the `cpia` command), `standard` (the
physical standard and naming rule), `schema` (the row schema), `atomic` (atomic file writes), `hub`
(Hub upload) and `resources` (the catalog and card templates).
"""

__version__ = "0.1.0"
