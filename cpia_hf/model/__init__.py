"""Publishing a model: the shared ViT backbone (`backbone`), the Hub export that timm and
transformers both load (`export`), its model card and the `ModelCardContext` schema (`card`), the
LR scaling and cosine schedule that pre-training and fine-tuning share (`optim`); `cli` holds
`cpia export`."""
