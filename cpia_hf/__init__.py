"""CPIA on the Hugging Face Hub: conversion, loading, pre-training and evaluation."""

__version__ = "0.1.0"
