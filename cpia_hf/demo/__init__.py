"""The offline demo: synthetic slides and ROIs (`synth`), the end-to-end run (`demo`); `cli` holds `cpia demo`."""
