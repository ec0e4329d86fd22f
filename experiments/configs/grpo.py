"""Default GRPO config: a tiny DeepSeek-V3 (MLA + MoE) learns multi-digit addition on a 2-core CPU.

Supervised warm start to a modest held-out pass@1, then GRPO with rule-based rewards; prints held-out pass@1
(greedy, 256 fixed problems) before and after. Every field is overridable: --config.grpo.steps=50.
"""

import ml_collections

from dsjax.train.loop import model_config_section


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The tiny preset cut to 2 layers (1 dense + 1 MoE): on a 2-core CPU it learns this task faster per second
    # than 3 layers. MTP is off: neither phase trains it, and it would only add compile time.
    c.model = model_config_section(
        "tiny", vocab_size=259, dtype="float32", num_nextn_predict_layers=0, num_hidden_layers=2
    )
    c.init_checkpoint = ""  # a pretraining --workdir to start from (its architecture is used)

    c.task = ml_collections.ConfigDict()
    c.task.name = "addition"
    c.task.tokenizer = "byte"
    c.task.max_digits = 2  # operands have min_digits..max_digits digits
    c.task.min_digits = 1
    c.task.num_eval = 256  # fixed held-out problems for pass@1 (never drawn for training)
    c.task.eval_seed = 1234

    c.sft = ml_collections.ConfigDict()  # supervised warm start (loss on answer + eos); 0 steps: none
    c.sft.steps = 1000  # at most; see target_pass_at_1
    c.sft.batch_size = 128
    c.sft.lr = 3e-3
    c.sft.warmup_steps = 20
    c.sft.weight_decay = 0.1
    c.sft.log_every = 50
    c.sft.target_pass_at_1 = 0.5  # stop once greedy pass@1 on training-stream problems reaches it (0: off)
    c.sft.check_every = 25  # steps between those checks

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 64  # prompts per GRPO step
    c.rollout.num_samples = 8  # G completions per prompt
    c.rollout.temperature = 0.7  # < 1 spends the samples near the greedy answer (what pass@1 scores); the
    # trainer's log-probs use the same temperature
    c.rollout.top_k = 0  # keep 0 / 1.0: the trainer's log-probs ignore truncation (see rollout.py)
    c.rollout.top_p = 1.0
    c.rollout.max_new_tokens = 0  # 0: the task's longest answer + eos + 1
    c.rollout.max_prompt_length = 0  # 0: the task's longest prompt + bos; longer prompts are an error
    c.rollout.cache_dtype = ""  # "" = the model's compute dtype

    c.rewards = ml_collections.ConfigDict()  # reward name -> weight (0 drops it)
    c.rewards.correct = 1.0  # exact answer, ended by eos
    c.rewards.format = 0.1  # digits then eos
    c.rewards.digits = 0.2  # partial credit per digit place

    c.grpo = ml_collections.ConfigDict()
    c.grpo.steps = 200
    c.grpo.mu = 2  # optimizer steps per rollout batch (> 1: the clip is live)
    c.grpo.loss_type = "grpo"  # grpo | dapo | dr_grpo
    c.grpo.advantage_scale = "group"  # group | batch | none
    c.grpo.epsilon_low = 0.2
    c.grpo.epsilon_high = 0.28  # DAPO clip-higher
    c.grpo.beta = 0.0  # KL weight; > 0 keeps a frozen reference copy of the warm start
    c.grpo.mask_truncated_completions = True
    c.grpo.dynamic_sampling = False  # DAPO: refill the batch with groups whose rewards differ
    c.grpo.dynamic_sampling_max_rounds = 3

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 20  # the first Adam steps on a noisy policy gradient are the riskiest
    c.optim.schedule = "cosine"  # decaying to the end settles the greedy answers pass@1 measures
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99  # smoother second moments for a noisy gradient
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # the policy should move only where the rewards push it
    c.optim.moment_dtype = "float32"  # b2 0.99: its 1% steps are near bf16's rounding, so keep float32 moments
    c.optim.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 0  # held-out pass@1 every n GRPO steps (0: only before and after)
    c.train.save_every = 50  # 0: no checkpoints at all (benchmarks; nothing to resume from)
    c.train.keep = 2  # >= 1
    c.train.max_skipped_steps = 3  # updates in a row with a non-finite loss or gradient (not applied) before stopping
    c.train.async_save = True
    c.train.tensorboard = True
    return c
