"""The MVPTR network: backbone (``MVPTRModel``), its heads and BERT initialisation."""
from mvptr_ds.model.bert_init import InitReport, init_from_bert
from mvptr_ds.model.heads import ITMHead, MaskedTokenHead
from mvptr_ds.model.mvptr import EncoderOutputs, MVPTRModel

__all__ = ["EncoderOutputs", "MVPTRModel", "MaskedTokenHead", "ITMHead", "init_from_bert", "InitReport"]
