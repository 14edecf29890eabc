"""Pre-training objectives (MVPTR.md section 3), one file each, and the module that sums them."""
from mvptr_ds.objectives.base import Gather, LossOutput, ModuleOutput, masked_token_loss, zero_loss
from mvptr_ds.objectives.itm import itm_loss
from mvptr_ds.objectives.mcr import mcr_loss
from mvptr_ds.objectives.mlm import mlm_loss
from mvptr_ds.objectives.pretraining import PretrainingModule, build_pretraining_module
from mvptr_ds.objectives.vsc import vsc_loss
from mvptr_ds.objectives.wpg import wpg_loss

__all__ = ["Gather", "LossOutput", "ModuleOutput", "PretrainingModule", "build_pretraining_module",
           "itm_loss", "masked_token_loss", "mcr_loss", "mlm_loss", "vsc_loss", "wpg_loss", "zero_loss"]
