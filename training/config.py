"""TrainConfig: every training option in one typed dataclass, read from a YAML recipe and overridden on the command line."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devices import resolve_device
from toy.hooks import CHECKPOINT as TOY_CHECKPOINT
from toy.hooks import is_builtin_toy

from .blocks import parse_table
from .loss import HUBER_SCHEDULES, LOSS_TYPES
from .noise import TIMESTEP_SAMPLINGS


def opt(default: Any, help: str) -> Any:
    """A config field with its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train on
    ckpt: str = opt("toy/tiny_sd.safetensors", "base checkpoint: an original SD 1.x/2.x or SDXL base .safetensors or .ckpt")
    images: str = opt("", "image folder with captions (name.txt beside each image, or metadata.jsonl); "
                          "empty with the built-in toy checkpoint: the toy world's new-concept images")
    prompt: str = opt("", "one caption for every image (DreamBooth instance prompt); empty: use the caption files")
    cache: str = opt("", "latent cache folder; empty: <out>/cache. Encoded on the first run, reused afterwards")
    resolution: int = opt(0, "training resolution in pixels (multiple of 8); 0: 32 for the built-in toy, 1024 for SDXL, else 512")
    bucket: bool = opt(False, "aspect-ratio bucketing instead of square crops")
    bucket_step: int = opt(64, "bucketing: bucket sides are multiples of this many pixels")
    flip: bool = opt(False, "also encode horizontally flipped copies")
    repeats: int = opt(1, "how many times each image is seen per epoch")
    out: str = opt("runs/lora", "output folder: LoRA files, training state, log.jsonl, samples")

    # --- what to train
    mode: str = opt("lora", "lora: train low-rank adapters; full: resume-train every UNet weight; ti: textual "
                            "inversion, a new token's vectors alone (the model stays untouched); pivotal: the new "
                            "token's vectors and an adapter (--adapter) together. ti/pivotal run the text encoder "
                            "in the loop, and autograd keeps its activations for the vectors' gradient: 19 MiB per image "
                            "for SD1.5's CLIP-L in bf16 (38 MiB in fp32), 0.3 MiB on the toy; its weights (235 MiB "
                            "bf16) are loaded in every mode (bench/ti_memory.py)")
    adapter: str = opt("lora", "the adapter (lora.inject's adapter=): lora (s·B·A), dora (Liu et al. 2024: magnitude "
                               "m and direction W0 + s·B·A, m per output channel), loha (Hadamard product "
                               "s·(B1·A1)⊙(B2·A2)), lokr (Kronecker product s·W1⊗W2); files in LyCORIS's layout")
    rank: int = opt(4, "rank r: the inner size of B·A (lora, dora), of each of LoHa's two products, of LoKr's W2 "
                       "(and W1 with lokr_decompose_both)")
    alpha: float = opt(0.0, "LoRA alpha; the update is scaled by alpha/r (or alpha/sqrt(r) with rs). 0 means alpha = rank")
    rs: bool = opt(False, "rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r")
    targets: str = opt("attn", "UNet layers to adapt: attn (q,k,v,out), attn-mlp (+proj_in/out, ff), all (+ResBlock convs), "
                               "or comma-separated glob patterns on module paths")
    init: str = opt("kaiming", "LoRA init: kaiming (A uniform, B zero), gaussian (A ~ N(0, 1/r), B zero), pissa (lora "
                               "only); loha and lokr start as LyCORIS does (one factor zero)")
    tucker: bool = opt(False, "3x3 convs (targets all) keep their kernel in a small r×r×3×3 core between 1x1 factors: "
                              "lora_mid (lora, dora), hada_t1/hada_t2 (loha), lokr_t2 (lokr); LyCORIS's use_tucker")
    dora_wd_on_output: bool = opt(True, "dora: one magnitude per output channel (peft, LyCORIS); false: per input "
                                        "channel, as older LyCORIS files")
    lokr_factor: int = opt(-1, "lokr: split each dimension as (f, dim/f) for this f, or the nearest divisor below it "
                               "(LyCORIS's factor); -1: as square as possible")
    lokr_decompose_both: bool = opt(False, "lokr: W1 low rank too (lokr_w1_a·lokr_w1_b) when the rank is below half "
                                           "its size")
    lokr_full_matrix: bool = opt(False, "lokr: W1 and W2 full matrices whatever the rank (the scale is then 1)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch input")
    train_text_encoder: bool = opt(False, "also train a LoRA on the text encoder (q,k,v,out_proj,fc1,fc2)")
    lr_text_encoder: float = opt(0.0, "learning rate for the text-encoder LoRA; 0: same as lr")
    lora_format: str = opt("kohya", "LoRA file layout: kohya (A1111/ComfyUI/Forge) or diffusers")

    # --- new tokens: textual inversion (mode ti) and pivotal tuning (mode pivotal)
    token: str = opt("", "ti/pivotal: the new token the concept is learned under, e.g. '<my-dog>'; it must not be one "
                         "token of the vocabulary already. Captions (or --prompt) must contain it; written to "
                         "embedding_*.safetensors")
    num_vectors: int = opt(1, "ti/pivotal: embedding vectors the token stands for (each takes one of the 75 prompt "
                              "positions)")
    init_word: str = opt("", "ti/pivotal: start every vector from this word's embedding (a word that is one token, "
                             "e.g. 'dog'); empty: random vectors with the embedding table's standard deviation")
    ti_lr: float = opt(5e-3, "ti/pivotal: learning rate of the token's vectors (the adapter keeps lr)")
    ti_steps: int = opt(0, "pivotal: the first N steps train the token's vectors alone, the adapter waits; 0: both "
                           "train from the start")
    ti_freeze: bool = opt(False, "pivotal: after ti_steps, freeze the token's vectors and train the adapter alone; "
                                 "false: both keep training")

    # --- optimisation
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(1, "images per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-4, "peak learning rate")
    lr_schedule: str = opt("constant", "constant, linear (decay to 0) or cosine (decay to 0)")
    warmup_steps: int = opt(0, "linear warm-up steps before the schedule")
    loraplus_ratio: float = opt(0.0, "LoRA+: learning rate of B = ratio × lr (0 or 1: off; the paper suggests 16)")
    block_ranks: str = opt("", "rank per UNet block: 'input_blocks.*=8,output_blocks.*=4' (globs, or re: regexes, "
                               "on module paths = checkpoint keys; the first match wins; 0: no adapter there)")
    block_alphas: str = opt("", "alpha per UNet block, as block_ranks: 'middle_block.*=2'")
    block_lrs: str = opt("", "learning rate per UNet block, as block_ranks: 'output_blocks.*=5e-4' (mode lora or full)")
    down_lr_weight: str = opt("", "sd-scripts' lr multipliers of the input blocks: a preset (linear, reverse_linear, "
                                  "sine, cosine, zeros; '+0.5' adds to each) or one number per block (12 on SD1/SD2, "
                                  "9 on SDXL); a block at 0 gets no adapter (training/blocks.py)")
    mid_lr_weight: str = opt("", "sd-scripts' lr multiplier of the middle block (a number)")
    up_lr_weight: str = opt("", "sd-scripts' lr multipliers of the output blocks, as down_lr_weight")
    optimizer: str = opt("adamw", "adamw, or adamw8bit (bitsandbytes; CUDA only)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = opt(0, "seed for init, data order, noise and timesteps")

    # --- the diffusion loss
    prediction_type: str = opt("auto", "auto (from the checkpoint), epsilon or v_prediction")
    min_snr_gamma: float = opt(0.0, "min-SNR-γ loss weighting (Hang et al. 2023; 5 is common; 0: off)")
    noise_offset: float = opt(0.0, "noise offset: add offset·N(0,1) per channel to the noise (0: off)")
    loss_type: str = opt("l2", "l2 (MSE, the DDPM loss), huber (pseudo-Huber: 2δ(sqrt(d²+δ²)-δ)) or smooth_l1 "
                               "(2(sqrt(d²+δ²)-δ)) (Khrapov et al. 2024; robust to outliers in the data)")
    huber_c: float = opt(0.1, "huber/smooth_l1: δ, in (0, 1]: the constant, or where the schedule ends at high noise")
    huber_schedule: str = opt("snr", "huber/smooth_l1: how δ follows the timestep: constant (c), exponential "
                                     "(c^(t/1000)) or snr ((1-c)/(1+σ_t)²+c), as sd-scripts' --huber_schedule")
    debiased_estimation: bool = opt(False, "weight the loss by 1/sqrt(SNR) (eps; SNR capped at 1000) or 1/(SNR+1) "
                                           "(v) (Yu et al. 2023, debiased estimation); with min_snr_gamma: both")
    zero_terminal_snr: bool = opt(False, "rescale the betas so that the last timestep is pure noise, ᾱ_T = 0 (Lin et "
                                         "al. 2024); needs v-prediction. Sample with sample.py --zero_terminal_snr "
                                         "(trailing spacing, --cfg_rescale 0.7 as the paper does)")
    multires_noise_iterations: int = opt(0, "multires (pyramid) noise: levels of lower-resolution noise added "
                                            "(Whitaker 2023; 6-10 common; 0: off)")
    multires_noise_discount: float = opt(0.3, "multires noise: weight of each level relative to the one above, "
                                              "in (0, 1]")
    ip_noise_gamma: float = opt(0.0, "input perturbation: the noisy input is made with noise + γ·N(0,1), the target "
                                     "keeps the noise (Ning et al. 2023; 0.1 common; 0: off)")
    masked_loss: bool = opt(False, "weight the loss per pixel by each image's mask: name.mask.png beside name.png "
                                   "(white = full weight) or the image's alpha channel, cached at latent resolution "
                                   "(images without one weigh 1), as sd-scripts' --masked_loss")
    min_timestep: int = opt(0, "lowest training timestep (inclusive)")
    max_timestep: int = opt(1000, "training timesteps below this (exclusive; 1000: all)")
    timestep_sampling: str = opt("uniform", "uniform, or logit_normal: t = sigmoid(N(logit_mean, logit_std²)) "
                                            "scaled to the range (Esser et al. 2024): more of the middle timesteps")
    logit_mean: float = opt(0.0, "timestep_sampling logit_normal: mean of the normal")
    logit_std: float = opt(1.0, "timestep_sampling logit_normal: standard deviation of the normal")
    shuffle_caption: bool = opt(False, "shuffle the comma-separated tags of each caption at every step (the text "
                                       "encoder then runs every step; training/captions.py)")
    keep_tokens: int = opt(0, "with shuffle_caption / caption_tag_dropout: keep the first N tags in place")
    caption_tag_dropout: float = opt(0.0, "drop each tag (after the kept ones) with this probability at every step")
    caption_dropout: float = opt(0.0, "probability of training a caption as unconditional, for CFG (SD1/SD2: the empty "
                                      "caption's embedding; SDXL: zero text and pooled vector, sizes kept); 0: off")

    # --- precision and memory
    precision: str = opt("auto", "fp32, bf16 (autocast, no scaler) or fp16 (fp16 weights, fp32 LoRA params, GradScaler; CUDA); "
                                 "auto: bf16 on CPU and bf16-capable GPUs, else fp16")
    gradient_checkpointing: bool = opt(False, "recompute UNet block activations in backward to save memory "
                                              "(blocks over fewer than 256 latent pixels keep theirs)")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto")

    # --- full fine-tuning
    ema_decay: float = opt(0.0, "full mode: keep an EMA of the UNet weights with this decay (0: off)")
    save_dtype: str = opt("auto", "dtype of the trained UNet tensors in saved full checkpoints: auto (the base file's), "
                                 "fp16, bf16 or fp32; untouched tensors always keep the base file's dtype")

    # --- DreamBooth prior preservation
    class_prompt: str = opt("", "DreamBooth: class prompt for prior-preservation images (empty: off)")
    num_class_images: int = opt(0, "DreamBooth: how many class images to generate with the frozen base and cache")
    prior_loss_weight: float = opt(1.0, "DreamBooth: λ in loss = instance + λ·prior")
    class_images: str = opt("", "prior preservation with images you have: a folder of captioned images (like "
                                "sd-scripts' reg_data_dir), encoded with their own captions; replaces class_prompt")

    # --- outputs
    save_every: int = opt(0, "write the LoRA / checkpoint every N steps (0: only at the end)")
    state_every: int = opt(0, "write a resumable training state every N steps (0: by time only, see state_every_minutes)")
    state_every_minutes: float = opt(10.0, "also write a resumable training state when this many minutes have passed "
                                           "since the last one, so a kill -9 or a power cut loses at most that much "
                                           "(0: off). Ctrl-C, SIGTERM and SIGHUP always save one")
    validate_every: int = opt(0, "render validation images every N steps (0: only at the end)")
    validation_images: str = opt("", "held-out captioned images: their denoising loss at fixed timesteps and noise "
                                      "is logged as val_loss (log.jsonl, TensorBoard; training/validation.py)")
    validation_split: float = opt(0.0, "hold out this fraction of the training images (chosen by the seed) for "
                                       "val_loss; training never sees them (0: off)")
    val_loss_every: int = opt(0, "with validation_images or validation_split: log val_loss every N steps "
                                 "(0: ten times per run)")
    validation_prompts: list = opt([], "validation prompts (fixed seeds); empty: none")
    validation_steps: int = opt(20, "sampler steps for validation images")
    validation_cfg: float = opt(5.0, "classifier-free guidance scale for validation images")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    resume: str = opt("", "resume from a training state: a path, or 'latest' for the newest in <out>/state. The run "
                          "continues with its saved options; options you give are compared with them: a changed "
                          "schedule (steps, lr, ...) is printed as 'changed: steps 60 -> 400', a change of what is "
                          "trained (rank, alpha, targets, mode, ckpt, images, ...) is refused")
    toy_eval: bool = opt(True, "with the built-in toy checkpoint: print concept and forgetting scores before and after")
    toy_concept: str = opt("purple", "with the built-in toy checkpoint and no --images: the held-out concept to learn "
                                   "(purple; star is blurred away by the toy VAE)")
    toy_images: int = opt(16, "with the built-in toy checkpoint and no --images: how many concept images to train on")
    toy_concept_word: str = opt("", "with the built-in toy checkpoint and no --images: the word that names the concept "
                                    "in the training captions and in the concept prompts of the scores; empty: the "
                                    "concept's own name (purple), or --token in ti/pivotal modes; e.g. 'sks' for a "
                                    "rare-token LoRA")
    toy_prior_images: int = opt(0, "with the built-in toy checkpoint: this many captioned base-world images as "
                                   "prior-preservation images (--class_images), against forgetting; 0: off")

    def validate(self) -> None:
        """Cheap checks that must fail before any model is loaded. Fills in 'auto' values."""
        if self.resolution == 0:
            self.resolution = 32 if is_builtin_toy(self.ckpt) else 512
        choices = {"mode": ("lora", "full", "ti", "pivotal"), "adapter": ("lora", "dora", "loha", "lokr"),
                   "lr_schedule": ("constant", "linear", "cosine"),
                   "optimizer": ("adamw", "adamw8bit"), "prediction_type": ("auto", "epsilon", "v_prediction"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "init": ("kaiming", "gaussian", "pissa"),
                   "lora_format": ("kohya", "diffusers"), "save_dtype": ("auto", "fp16", "bf16", "fp32"),
                   "loss_type": LOSS_TYPES, "huber_schedule": HUBER_SCHEDULES,
                   "timestep_sampling": TIMESTEP_SAMPLINGS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        self.check_adapter()
        if self.resolution < 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        for key in ("steps", "batch_size", "grad_accum", "repeats"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key, f in FIELDS.items():  # nan passes every comparison below, so it is refused first
            value = getattr(self, key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 means alpha = rank), got {self.alpha}")
        self.check_noise_and_loss()
        if not 0 <= self.caption_tag_dropout < 1 or self.keep_tokens < 0:
            raise ValueError(f"need caption_tag_dropout in [0, 1) and keep_tokens >= 0, got "
                             f"{self.caption_tag_dropout} and {self.keep_tokens}")
        if not 0 <= self.validation_split < 1 or self.val_loss_every < 0:
            raise ValueError(f"need validation_split in [0, 1) and val_loss_every >= 0, got {self.validation_split} "
                             f"and {self.val_loss_every}")
        if self.validation_images and not Path(self.validation_images).is_dir():
            raise ValueError(f"validation_images: folder not found: {self.validation_images}")
        for key in ("block_ranks", "block_alphas", "block_lrs"):
            parse_table(getattr(self, key), key)
        if not Path(self.ckpt).is_file():
            raise ValueError(f"ckpt: checkpoint file not found: {self.ckpt}")
        resolve_device(self.device)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                             "log.jsonl in the output folder has the same numbers")
        if self.images and not Path(self.images).is_dir():
            raise ValueError(f"images: dataset folder not found: {self.images}")
        if self.class_images and not Path(self.class_images).is_dir():
            raise ValueError(f"class_images: folder not found: {self.class_images}")
        if self.class_images and self.class_prompt:
            raise ValueError("class_images and class_prompt are two ways to get prior images: give one of them")
        if self.state_every < 0 or self.state_every_minutes < 0:
            raise ValueError("state_every and state_every_minutes must be >= 0 (0: off)")
        if self.toy_prior_images < 0:
            raise ValueError(f"toy_prior_images must be >= 0, got {self.toy_prior_images}")
        self.check_new_token()

    def check_new_token(self) -> None:
        """The textual-inversion options: a valid new token for ti/pivotal, none for the other modes."""
        learns_token = self.mode in ("ti", "pivotal")
        if not learns_token:
            given = [k for k in ("token", "init_word") if getattr(self, k)] + (["ti_steps"] if self.ti_steps else [])
            if given:
                raise ValueError(f"{given[0]}: only for --mode ti or pivotal (mode is {self.mode})")
            return
        if not self.token:
            raise ValueError(f"token: --mode {self.mode} learns a new token: give one, e.g. --token '<my-concept>'")
        if self.train_text_encoder:
            raise ValueError(f"train_text_encoder: --mode {self.mode} trains the token's vectors in the text encoder; "
                             f"a text-encoder LoRA beside them is not supported")
        if not 1 <= self.num_vectors <= 75:
            raise ValueError(f"num_vectors must be between 1 and 75 (the prompt's positions), got {self.num_vectors}")
        if self.ti_lr <= 0:
            raise ValueError(f"ti_lr must be positive, got {self.ti_lr}")
        if self.ti_steps < 0 or (self.ti_steps and self.mode != "pivotal"):
            raise ValueError(f"ti_steps: the embeddings-alone warm start of --mode pivotal (>= 0), got {self.ti_steps} "
                             f"with mode {self.mode}")
        from text import CLIPTokenizer
        from text.new_tokens import check_token, init_word_id

        tokenizer = CLIPTokenizer()
        check_token(tokenizer, self.token)
        if self.init_word:
            init_word_id(tokenizer, self.init_word)
        if self.prompt and self.token.lower() not in self.prompt.lower():
            raise ValueError(f"prompt: {self.prompt!r} does not contain the token {self.token!r} being trained")

    def toy_word(self) -> str:
        """The word that names the toy's concept in its captions and concept prompts."""
        return self.toy_concept_word or (self.token if self.mode in ("ti", "pivotal") else self.toy_concept)

    def check_noise_and_loss(self) -> None:
        if not 0 < self.huber_c <= 1:
            raise ValueError(f"huber_c must be in (0, 1], got {self.huber_c}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(f"timesteps: need 0 <= min_timestep < max_timestep <= 1000, got min_timestep "
                             f"{self.min_timestep}, max_timestep {self.max_timestep}")
        if self.multires_noise_iterations < 0 or not 0 < self.multires_noise_discount <= 1:
            raise ValueError(f"multires noise: need iterations >= 0 and a discount in (0, 1], got "
                             f"{self.multires_noise_iterations} and {self.multires_noise_discount}")
        if self.ip_noise_gamma < 0 or self.logit_std <= 0:
            raise ValueError(f"need ip_noise_gamma >= 0 and logit_std > 0, got {self.ip_noise_gamma} and "
                             f"{self.logit_std}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr: the last timestep becomes pure noise (SNR 0), where an "
                             "eps-prediction model cannot tell x0; use --prediction_type v_prediction")

    def check_adapter(self) -> None:
        """The options that do not go with the chosen adapter."""
        if self.init == "pissa" and self.adapter != "lora":
            raise ValueError(f"init: pissa starts LoRA from W0's top singular vectors; it is for --adapter lora, "
                             f"not {self.adapter}")
        if self.init != "kaiming" and self.adapter in ("loha", "lokr"):
            raise ValueError(f"init: {self.init} is a LoRA init; {self.adapter} starts as LyCORIS does (leave init "
                             f"at kaiming)")
        if self.lora_format == "diffusers" and (self.adapter in ("loha", "lokr") or self.tucker):
            what = f"--adapter {self.adapter}" if self.adapter in ("loha", "lokr") else "--tucker"
            raise ValueError(f"lora_format: diffusers/peft files have no layout for {what}; use kohya (LyCORIS's "
                             f"layout, which A1111, ComfyUI, sd-scripts and LyCORIS read)")
        if self.loraplus_ratio not in (0.0, 1.0) and self.adapter in ("loha", "lokr"):
            raise ValueError(f"loraplus_ratio: LoRA+ speeds up B of B·A; {self.adapter} has no such factor")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lokr_factor must be -1 or a positive integer, got {self.lokr_factor}")

    def adapter_options(self) -> dict[str, Any]:
        """lora.inject's adapter= and that adapter's own options (lora.ADAPTER_OPTIONS)."""
        options: dict[str, Any] = {"tucker": self.tucker}
        if self.adapter == "dora":
            options["wd_on_output"] = self.dora_wd_on_output
        if self.adapter == "lokr":
            options.update(factor=self.lokr_factor, decompose_both=self.lokr_decompose_both,
                           full_matrix=self.lokr_full_matrix)
        return {"adapter": self.adapter, **options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# `python train.py` on the built-in toy checkpoint without --config starts from this recipe: the toy's own settings
# (small images, a larger batch and learning rate) instead of the defaults above, which suit SD 1.x/2.x files.
TOY_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


def _closest(key: str) -> str:
    near = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, with an error naming the key."""
    default = FIELDS[key].default if FIELDS[key].default is not dataclasses.MISSING else FIELDS[key].default_factory()
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split("|") if v.strip()]
            return list(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: cannot read {value!r} as {type(default).__name__}") from None


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    cfg = base or TrainConfig()
    for key, value in values.items():
        if key not in FIELDS:
            raise ValueError(f"{source}: unknown key {key!r}{_closest(key)}")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of key: value")
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a LoRA (or resume-train the whole UNet) on an original SD checkpoint. With no arguments: "
                    "a LoRA for a new concept on the built-in toy model, on CPU, in a few minutes. "
                    "Every key below can also be set in a YAML recipe (--config); the command line wins. "
                    "On the built-in toy checkpoint without --config, the recipe configs/tiny_cpu.yaml "
                    "replaces the defaults shown below.",
    )
    p.add_argument("--config", default="", help="YAML recipe (see configs/)")
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = "bool" if isinstance(default, bool) else "list, '|'-separated" if isinstance(default, list) else type(default).__name__
        p.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=kind.upper().split(",")[0],
                       help=f"{f.metadata['help']} [{kind}; default: {default!r}]")
    return p


def parse_command_line(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, the options the user gave): defaults, then the YAML recipe, then command-line overrides. The given
    options are those of --config and of the command line (not the toy's implicit recipe): a resumed run compares
    them with its saved configuration. Unknown keys suggest the closest valid one."""
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        key = unknown[0].lstrip("-").split("=")[0].replace("-", "_")
        p.error(f"unknown option {unknown[0]!r}{_closest(key)}")
    values = vars(args)
    recipe = values.pop("config")
    given: dict[str, Any] = {}
    if recipe:
        given.update(load_yaml(recipe))
    elif is_builtin_toy(values.get("ckpt", TrainConfig.ckpt)):
        recipe = TOY_RECIPE
    cfg = TrainConfig()
    if recipe:
        cfg = from_dict(load_yaml(recipe), cfg, source=recipe)
    cfg = from_dict(values, cfg, source="command line")
    given.update(values)
    return cfg, {k: getattr(cfg, k) for k in given}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The configuration alone (see parse_command_line)."""
    return parse_command_line(argv)[0]


# What a resumed run cannot change: these decide what is trained (the shapes of the saved weights, the data, the
# base and the objective). Anything else (steps, lr, schedule, saving, device, precision) may change, and is printed.
FIXED_ON_RESUME = ("mode", "ckpt", "rank", "alpha", "rs", "targets", "train_text_encoder", "lora_format", "images",
                   "cache", "prompt", "resolution", "bucket", "bucket_step", "flip", "repeats", "prediction_type",
                   "class_prompt", "class_images", "num_class_images", "toy_concept", "toy_images", "toy_prior_images",
                   "adapter", "tucker", "dora_wd_on_output", "lokr_factor", "lokr_decompose_both", "lokr_full_matrix",
                   "zero_terminal_snr", "block_ranks", "block_alphas", "block_lrs", "down_lr_weight", "mid_lr_weight",
                   "up_lr_weight", "validation_split",
                   "token", "num_vectors", "init_word", "toy_concept_word")
# Where the run is and how to find its state: never compared.
NOT_COMPARED = ("out", "resume")


def resumed_config(saved: dict[str, Any], given: dict[str, Any], source: str) -> tuple[TrainConfig, list[str]]:
    """The configuration of a resumed run: the saved one, with the options the user gave on top.

    Returns (config, ["steps 60 -> 400", ...]: the options that change). A change of an option in FIXED_ON_RESUME
    raises one ValueError that lists every such difference. `source` names the state file in messages."""
    known = {k: v for k, v in saved.items() if k in FIELDS}  # a key of an older version of this file is ignored
    cfg = from_dict(known, TrainConfig(), source=source)
    before = dataclasses.replace(cfg)
    changed, refused = [], []
    for key, value in given.items():
        if key in NOT_COMPARED or key not in known:
            setattr(cfg, key, value)
            continue
        old = getattr(before, key)
        if _same(key, old, value):
            continue
        line = f"{key} {old!r} -> {value!r}" if isinstance(old, str) else f"{key} {old} -> {value}"
        (refused if key in FIXED_ON_RESUME else changed).append(line)
        setattr(cfg, key, value)
    if refused:
        raise ValueError(f"resume: {source} was trained with other settings, and these decide what is trained: "
                         + "; ".join(refused) + ". Start a new run in another --out folder, or leave these options "
                         "out to continue with the saved ones")
    return cfg, changed


def _same(key: str, old: Any, new: Any) -> bool:
    if key in ("ckpt", "images", "cache", "class_images") and old and new:
        return Path(old).resolve() == Path(new).resolve()  # the same file, however it is written
    return old == new
