"""DeepSeek-V3 model (arXiv 2412.19437). Import `trainer.model.transformer.build_model`; this
package init stays light so that `trainer.model.config` never pulls in torch."""
