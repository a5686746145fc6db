"""Every key a training config has, with the paper recipe's values as defaults.

Config files in configs/ start from `base_config()` and change what differs, so `--config.key=value` overrides
work for every key and a typo is rejected by name.
"""

from flax import nnx
from ml_collections import ConfigDict

from dig_jax.models import create_model
from dig_jax.models.sequence_parallel import SEQUENCE_AXIS


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.name = "DiG-S/2"        # see dig_jax.models.MODELS
    c.model.input_size = 32         # latent (or pixel) grid side
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.learn_sigma = True
    c.model.options = ConfigDict()  # extra create_model overrides, e.g. gla_impl, attention_impl, class_dropout_prob

    c.data = ConfigDict()
    c.data.name = "imagenet2012"    # see dig_jax.data.DATASETS; "latents": pre-encoded by `python -m dig_jax.encode`
    c.data.split = "train"
    c.data.space = "latent"         # "pixel": train on images; "latent": on VAE latents (of images encoded online,
                                    # or of data.name="latents"), x0 = posterior sample * scaling factor
    c.data.image_size = 256
    c.data.random_flip = True
    c.data.batch_reads = True       # datasets with read_batch ("latents") are read a batch at a time in the trainer's
                                    # process (worker_count and read_threads apply to the others, read per record)
    c.data.worker_count = 4         # loader processes: with 0 the loader's Python shares the trainer's interpreter
                                    # and slows its dispatch (DiG-S/2 on one H200: 0.24-0.62 of the step's speed with
                                    # 0, 0.94-0.95 with 4; docs/benchmarks.md)
    c.data.read_threads = 16        # record-reading threads per process; 0 reads in the loader's own thread
    c.data.prefetch = 2             # batches a background thread reads ahead of the training loop (0: on demand)
    c.data.kwargs = ConfigDict()    # dataset constructor options, e.g. data_dir, num_images

    c.vae = ConfigDict()            # latent space: a diffusers AutoencoderKL folder (config.json + safetensors)
    c.vae.path = ""                 # e.g. a local copy of stabilityai/sd-vae-ft-ema; encodes online, decodes samples
    c.vae.compute_dtype = "float32"  # VAE computation dtype (online encoding, decoding, dig_jax.encode); or "bfloat16"

    c.encode = ConfigDict()         # `python -m dig_jax.encode`: latents of config.data's split (dig_jax.data.latents)
    c.encode.batch_size = 128       # images per jitted encode call on each host (a multiple of its device count)
    c.encode.shard_size = 5000      # records per ArrayRecord shard; shard i is written by host i % process_count
    c.encode.flip = True            # also store the mirrored image's moments (what data.random_flip picks in training)
    c.encode.dtype = "float16"      # storage dtype of the moments: "float16" (half the disk) or "float32"
    c.encode.read_threads = 16      # threads that read and decode images
    c.encode.max_shards = 0         # write at most this many shards on each host, then stop (0: all); rerun to go on

    c.optimizer = ConfigDict()      # AdamW, official recipe: lr 1e-4 constant, no weight decay, no clipping
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0  # 0 disables clipping

    c.ema_decay = 0.9999
    c.global_batch_size = 256
    c.num_steps = 400_000
    c.compute_dtype = "float32"     # "bfloat16": bf16 activations, float32 parameters and optimizer state
    c.remat = "none"                # block rematerialisation (dig_jax.models.layers.REMAT_POLICIES): "none", "matmuls"
                                    # (recompute the elementwise work: less memory, little time) or "full" (least
                                    # memory, ~30% more compute)

    c.mesh = ConfigDict()
    c.mesh.data = -1                # data-parallel size; -1 = all devices left after fsdp
    c.mesh.fsdp = 1                 # parameter/optimizer sharding size
    c.mesh.seq = 1                  # sequence-parallel size (DiG only): each image's tokens split over this many
                                    # devices, for high resolutions (dig_jax/models/sequence_parallel.py)

    c.distributed = ConfigDict()    # multi-process runs (dig_jax/distributed.py, launch/README.md)
    c.distributed.cluster = "auto"  # "auto": explicit keys below, else SLURM / Cloud TPU detection; "none": 1 process
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or detected
    c.distributed.num_processes = 0  # 0 = $JAX_NUM_PROCESSES or detected
    c.distributed.process_id = -1   # -1 = $JAX_PROCESS_ID or detected

    c.log_every = 100
    c.checkpoint_every = 5_000
    c.steps_per_call = 1            # train steps per dispatch (a scan over as many batches): > 1 hides the host's
                                    # per-step cost for small models; num_steps, log_every, checkpoint_every must be
                                    # multiples of it
    c.keep_checkpoints = 3

    c.sample = ConfigDict()         # sample grid written at the end of training
    c.sample.per_class = 0          # images per class; 0 skips the grid
    c.sample.num_steps = 250
    c.sample.sampler = "ddpm"
    c.sample.cfg_scale = 1.0

    c.eval = ConfigDict()           # FID during training (dig_jax/evaluation/training.py, docs/evaluation.md)
    c.eval.every = 0                # steps between evaluations (a multiple of steps_per_call); 0: off
    c.eval.num_images = 5_000       # samples per evaluation, drawn with config.sample's sampler, steps and guidance
    c.eval.batch_size = 64          # images per sampling and Inception call
    c.eval.reference = ""           # ADM-layout reference npz: mu, sigma, mu_s, sigma_s and/or arr_0 images
    c.eval.inception_weights = ""   # pytorch-fid's pt_inception-2015-12-05-*.pth or its .safetensors conversion
    return c


def model_from_config(config: ConfigDict) -> nnx.Module:
    """The model a training config describes, initialised from config.seed."""
    m = config.model
    dtype = None if config.compute_dtype == "float32" else config.compute_dtype
    split_tokens = {"sequence_axis": SEQUENCE_AXIS} if config.mesh.seq > 1 else {}

    @nnx.jit  # one compiled initialisation instead of one dispatch per parameter
    def build():
        return create_model(m.name, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                            learn_sigma=m.learn_sigma,
                            rngs=nnx.Rngs(params=config.seed, label_dropout=config.seed + 1),
                            dtype=dtype, remat=config.remat, **split_tokens, **m.options.to_dict())

    return build()


PAPER_RESULTS = {  # FID-50K at 256 px after 400K steps (spec section 5), for the configs' docstrings and README
    "DiG-S/2": 62.06, "DiG-B/2": 39.50, "DiG-L/2": 22.90, "DiG-XL/2": 18.53,
    "DiT-S/2": 68.40, "DiT-B/2": 43.47, "DiT-L/2": 23.33, "DiT-XL/2": 19.47,
}


def paper_config(model_name: str) -> ConfigDict:
    """The official ImageNet 256 recipe (spec section 3) for `model_name`: latent 32x32x4 from sd-vae-ft-ema,
    AdamW 1e-4, global batch 256, EMA 0.9999, 400K steps, float32 compute."""
    c = base_config()
    c.model.name = model_name
    c.data.name = "imagenet2012"
    c.data.space = "latent"
    c.data.image_size = 256
    c.data.kwargs = ConfigDict({"data_dir": ""})
    c.sample.per_class = 0
    # Four steps per dispatch: with one, the host's dispatch of a DiG-S/2 step at batch 32 (6-7 ms on an H100 host)
    # nearly equals the step (7.1 ms) and the loop ran at 0.86-0.92 of the step's speed; with four at 1.01, and
    # DiG-XL/2 at 1.01 too (docs/benchmarks.md, "Latents a batch at a time").
    c.steps_per_call = 4
    return c
