"""Publishing a model: the shared ViT backbone (`backbone`), the Hub export that timm and
transformers both load (`export`) and its model card (`card`); `cli` holds `cpia export`."""
