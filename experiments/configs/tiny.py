"""Default pretraining config: a tiny DeepSeek-V3 (MLA + MoE + MTP) on the Python stdlib, bytes as tokens.

Sized for a laptop / 2-core CI CPU: finishes in well under 10 minutes. Every section is overridable from the
command line, e.g. --config.train.steps=200 --config.model.num_hidden_layers=4.
"""

import ml_collections

from dsjax.train.loop import model_config_section


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # A dsjax.ModelConfig preset plus any of its fields (None = the preset's value), architecture and runtime
    # knobs alike: --config.model.num_hidden_layers=4, --config.model.dtype=bfloat16, --config.model.remat=full
    c.model = model_config_section("tiny", vocab_size=259, dtype="float32")

    c.data = ml_collections.ConfigDict()
    c.data.spec = "stdlib"  # "stdlib", text globs, "jsonl:GLOB[:field]", "array_record:GLOB[:field]"
    c.data.eval_spec = ""  # empty: a deterministic ~2% split of `spec`
    c.data.tokenizer = "byte"  # "byte" or a path to tokenizer.json
    c.data.seq_len = 128
    c.data.batch_size = 32  # global batch (rows of seq_len tokens) per optimizer step
    c.data.add_bos = True

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"  # cosine | constant | step
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9  # DeepSeek-V3: beta1 0.9, beta2 0.95, weight decay 0.1, clip 1.0
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.moment_dtype = "float32"  # AdamW moments' storage: float32 or bfloat16 (DeepSeek-V3)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 500
    c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
    c.train.mtp_lambda = 0.3  # MTP loss weight (DeepSeek-V3: 0.3, later 0.1); 0 turns MTP off
    c.train.balance_alpha = 1e-4  # sequence-wise balance loss weight
    c.train.bias_gamma = 1e-3  # aux-loss-free router bias update speed
    c.train.seed = 0
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.save_every = 250
    c.train.keep = 3  # checkpoints kept (>= 1)
    c.train.max_skipped_steps = 3  # steps in a row with a non-finite loss or gradient (not applied) before stopping
    c.train.allow_data_change = False  # resume although the data settings changed (the data restarts)
    c.train.async_save = True
    c.train.peak_tflops = 0.0  # per-device peak for MFU; 0 = detect (unknown on CPU: MFU not shown)
    c.train.tensorboard = True
    return c
