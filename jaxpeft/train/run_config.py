"""The settings of one fine-tuning run (`jaxpeft.train.run.run_finetune`), as one frozen dataclass."""

from __future__ import annotations

import dataclasses

DEFAULT_DATASET = "builtin:dates"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    out: str
    model: str | None = None
    dataset: str = DEFAULT_DATASET
    eval_split: float | str | None = None
    eval_dataset: str | None = None
    dataset_split: str = "train"  # the split to train on (hub datasets, saved DatasetDicts)
    dataset_config: str | None = None  # the hub dataset's configuration / subset
    dataset_text_field: str = "text"  # the column of `text` records
    field_map: str | None = None  # "yours:theirs,..." renames record fields before formats are recognised
    train_on: str | None = None  # which tokens are targets (jaxpeft.data.targets); None: each format's default
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's chat template
    truncation: str = "prompt_left"  # prompt_left | right | drop (jaxpeft.data.encode)
    steps: int = 200
    epochs: int | None = None  # set: the run takes the batches of that many epochs (run_data.RunData.steps), not `steps`
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    pack: bool = True  # several whole examples a row (batching.Batcher); False: one a row
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "auto"  # compute dtype; auto: the base's float dtype (core/dtypes.py)
    param_dtype: str = "auto"  # stored dtype of the base weights; auto: the checkpoint's
    remat: bool = False
    loss_chunk: int | None = None  # targets per chunk of the head + loss (train/chunked_loss.py); None auto, 0 off
    remat_offload: bool = False  # GPU: checkpointed activations go to host memory (models/remat.py)
    attention: str = "auto"  # kernels/attention implementation: auto | dense | blockwise | cudnn
    attention_block: int = 512  # query / key block of the blockwise attention
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_examples: int = 100  # held-out examples evaluated (loss and generation)
    resume: bool = False
    overwrite: bool = False
    save_merged: bool = False
    merged_dtype: str = "auto"  # "auto": the base's dtype (core.dtypes.tree_dtype_name)
    progress: bool = True
    mesh: str | None = None  # "data:2,fsdp:2,tensor:2" or "expert:4" (MoE); None: every device on data (train/sharding.py)
    parallel: str = "jit"  # "jit" (the mesh) or "pmap"
