"""A small SegSR for real photos, trained from scratch on a CPU, and its stages.

Data (training photos from Debian packages, never the held-out evaluation photos)::

    python scripts/fetch_photos.py
    python scripts/prepare_photos.py --out data/photo --names "$(python -c \
        'import configs.photo as p; print(",".join(p.CLASS_NAMES))')"

Stages, each from the previous one's checkpoint (resumable: rerun the same command)::

    python -m segsr_jax.train --config configs/photo.py:vae   --workdir runs/photo/vae
    python -m segsr_jax.train --config configs/photo.py:sr    --workdir runs/photo/sr
    python -m segsr_jax.train --config configs/photo.py:seg   --workdir runs/photo/seg
    python -m segsr_jax.train --config configs/photo.py:joint --workdir runs/photo/joint
    python -m segsr_jax.weights.fetch lpips   # the decoder's perceptual loss
    python -m segsr_jax.train --config configs/photo.py:decoder --workdir runs/photo/decoder

``decoder`` fine-tunes only the VAE's decoder of the joint model with L1 + LPIPS (the encoder
and so the latent space the diffusion stages learned stay): the L1-only autoencoder of ``vae``
is blurry, and its round trip bounds what the sampler's output can be.

The classes are pseudo-classes: k-means clusters of ImageNet-VGG16 features of the training
photos (``scripts/prepare_photos.py``), named after what their contact sheets show
(``docs/realphoto/classes/``); no person labelled a pixel.

Architecture, chosen for CPU speed as well: the tiny model's widths, but no self-attention at
full latent resolution (UNet and ControlNet attend only at their 1/2-resolution level, SegDM and
the VAE's mid-block not at all). For a 128x96 photo (a 128x96 latent at the VAE's factor 4)
the tiny model attends over all 12,288 latent positions in the UNet, SegDM and the VAE, which
is most of its 64 s on this 2-core CPU.
"""

import dataclasses

from ml_collections import ConfigDict

from configs import tiny
from segsr_jax.models.controlnet import controlnet_config_from_unet
from segsr_jax.models.segsr import SegSRConfig

# Names of the k-means pseudo-classes, in class order, given by looking at their contact sheets
# (docs/realphoto/classes/overview.jpg; scripts/prepare_photos.py, seed 0, K=10, 84 images).
CLASS_NAMES = (
    "stripes",  # parallel edges: planks, cables, rails
    "warm surface",  # smooth red, orange and yellow: petals, cups, fruit
    "dark flat",  # shadows, night, dark plain surfaces
    "dark foliage",  # leaves and stems against dark or blurred backgrounds
    "fine detail",  # rock, water spray, circuit boards, buildings: dense texture
    "bright haze",  # overexposed sky, clouds, sun glare
    "pale gradient",  # smooth pale sky and out-of-focus gradients
    "green blur",  # close-up or out-of-focus leaves and grass
    "ground",  # grass fields, soil, gravel, terrain seen from afar
    "blue sky",  # saturated blue sky
)
NUM_CLASSES = len(CLASS_NAMES)
DATA = "data/photo"
PREVIOUS = {"sr": "vae", "seg": "sr", "joint": "seg", "decoder": "joint"}
# name: (training stage, steps, learning rate, modules trained besides the stage's own)
STAGES = {
    "vae": ("vae", 1500, 1e-3, ()),
    "sr": ("sr", 3000, 5e-4, ("unet",)),
    "seg": ("seg", 1000, 5e-4, ("segformer",)),
    "joint": ("joint", 1500, 2e-4, ("unet",)),
    "decoder": ("decoder", 1500, 2e-4, ()),
}
INFERENCE = dict(min_side=32, tile=32, tile_overlap=8)


def model_config(class_names: tuple[str, ...] = CLASS_NAMES) -> SegSRConfig:
    """The photo architecture: tiny's widths, attention only below full latent resolution
    (``class_names``: the segmentation's classes; configs/aliased.py uses its own)."""
    base = tiny.model_config()
    vae = dataclasses.replace(
        base.vae, block_out_channels=(32, 64, 64), mid_block_add_attention=False
    )
    unet = dataclasses.replace(
        base.unet,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    # The ControlNet encoder follows the UNet's; tiny's conditioning settings are kept.
    keep = ("conditioning", "conditioning_channels", "conditioning_embedding_out_channels")
    controlnet = controlnet_config_from_unet(unet, {k: getattr(base.controlnet, k) for k in keep})
    k = len(class_names)
    segformer = dataclasses.replace(base.segformer, num_labels=k, id2label=class_names)
    segdm = dataclasses.replace(base.segdm, num_classes=k, attention_blocks=())
    return SegSRConfig(
        vae=vae,
        text=base.text,
        unet=unet,
        controlnet=controlnet,
        segformer=segformer,
        segdm=segdm,
        bridge=base.bridge,
        class_names=class_names,
    )


def get_config(name: str = "vae") -> ConfigDict:
    """The photo run ``name`` (``vae``, ``sr``, ``seg``, ``joint`` or ``decoder``)."""
    if name not in STAGES:
        raise ValueError(f"unknown photo run {name!r}; choose one of {sorted(STAGES)}")
    stage, steps, lr, also_train = STAGES[name]
    c = tiny.get_config("vae" if name == "decoder" else name)
    c.num_steps = steps
    c.model = model_config().to_dict()
    c.init_from = f"runs/photo/{PREVIOUS[name]}/checkpoints" if name in PREVIOUS else ""
    c.train.stage, c.train.also_train = stage, also_train
    c.optim.learning_rate, c.optim.decay_steps = lr, steps
    c.optim.lr_multipliers = {"bridge": 10.0} if name == "joint" else {}
    c.data.source = "folder"
    c.data.path = f"{DATA}/images"
    c.data.labels = f"{DATA}/labels"
    c.data.crop_size = 64
    c.sample.every = 0 if stage in ("vae", "decoder") else steps
    c.sample.options.update(INFERENCE)
    return c
