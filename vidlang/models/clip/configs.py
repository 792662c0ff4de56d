"""Tower shapes: :class:`ImageConfig` / :class:`TextConfig` and named presets.

Presets are registered factories (``IMAGE_CONFIGS.get("vit_b32")()`` returns a fresh config).
Architecture only: weights come from a separate pretrained source (docs/architecture.md).
:data:`KNOWN_IMAGE` / :data:`KNOWN_TEXT` hold the shape signatures of released ViT CLIP
architectures, to tell a bare weights file's attention heads (weights cannot show them).
"""

from __future__ import annotations

from dataclasses import dataclass

from vidlang.registry import Registry

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig:
    width: int = 768  # C
    layers: int = 12
    heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    embed_dim: int = 512  # E
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None  # hidden size of the MLP; None = width * mlp_ratio
    act: str = "quick_gelu"
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.width * self.mlp_ratio)


@dataclass
class TextConfig:
    width: int = 512  # W
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512  # E
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None  # hidden size of the MLP; None = width * mlp_ratio
    act: str = "quick_gelu"

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.width * self.mlp_ratio)


IMAGE_CONFIGS: Registry = Registry("image tower config")
TEXT_CONFIGS: Registry = Registry("text tower config")

# The text preset that pairs with each image preset (same embedding size E), used by ``text="auto"``.
DEFAULT_TEXT: dict[str, str] = {
    "vit_b32": "text_b",
    "vit_b16": "text_b",
    "vit_l14": "text_l",
    "vit_l14_336": "text_l",
    "vit_tiny": "text_tiny",
}


@IMAGE_CONFIGS.register("vit_b32")
def vit_b32() -> ImageConfig:
    return ImageConfig(width=768, layers=12, heads=12, patch_size=32, image_size=224, embed_dim=512)


@IMAGE_CONFIGS.register("vit_b16")
def vit_b16() -> ImageConfig:
    return ImageConfig(width=768, layers=12, heads=12, patch_size=16, image_size=224, embed_dim=512)


@IMAGE_CONFIGS.register("vit_l14")
def vit_l14() -> ImageConfig:
    return ImageConfig(width=1024, layers=24, heads=16, patch_size=14, image_size=224, embed_dim=768)


@IMAGE_CONFIGS.register("vit_l14_336")
def vit_l14_336() -> ImageConfig:
    return ImageConfig(width=1024, layers=24, heads=16, patch_size=14, image_size=336, embed_dim=768)


@IMAGE_CONFIGS.register("vit_tiny")
def vit_tiny() -> ImageConfig:
    """Test shape: 64 wide, 3 layers, 4 heads, 32x32 images of 8x8 patches (grid 4x4), E = 32."""
    return ImageConfig(width=64, layers=3, heads=4, patch_size=8, image_size=32, embed_dim=32)


@TEXT_CONFIGS.register("text_b")
def text_b() -> TextConfig:
    return TextConfig(width=512, layers=12, heads=8, embed_dim=512)


@TEXT_CONFIGS.register("text_l")
def text_l() -> TextConfig:
    return TextConfig(width=768, layers=12, heads=12, embed_dim=768)


@TEXT_CONFIGS.register("text_tiny")
def text_tiny() -> TextConfig:
    """Test shape: 48 wide, 2 layers, 4 heads, context 24, vocabulary 512, E = 32."""
    return TextConfig(width=48, layers=2, heads=4, context_length=24, vocab_size=512, embed_dim=32)


def image_config(name: str) -> ImageConfig:
    return IMAGE_CONFIGS.get(name)()


def text_config(name: str) -> TextConfig:
    return TEXT_CONFIGS.get(name)()


# ---------------------------------------------------------------------------------------------
# Known architectures: what a bare weights file cannot say (attention heads, activation)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownTower:
    """Shape signature of one tower of a released ViT CLIP architecture (open_clip / OpenAI), and its heads.

    Matched on ``(width, layers, mlp_dim[, patch_size])``: image size, context length and vocabulary
    are left out (fine-tunes change them; they do not change the heads).
    """

    name: str  # open_clip model name(s) sharing this tower shape
    width: int
    layers: int
    mlp_dim: int
    heads: int
    patch_size: int | None = None  # image towers only
    openai: bool = False  # OpenAI released weights of this shape (their towers use quick_gelu)
    quick_gelu_variant: bool = False  # open_clip also ships a ``-quickgelu`` config of this shape


# Head width is 64 up to ViT-L; ViT-H/14 uses 80, ViT-g 88, ViT-bigG 104, ViT-e 112 (16 heads each).
KNOWN_IMAGE: tuple[KnownTower, ...] = (
    KnownTower("ViT-S-32", 384, 12, 1536, 6, patch_size=32),
    KnownTower("ViT-S-16", 384, 12, 1536, 6, patch_size=16),
    KnownTower("ViT-M-32", 512, 12, 2048, 8, patch_size=32),
    KnownTower("ViT-M-16", 512, 12, 2048, 8, patch_size=16),
    KnownTower("ViT-B-32", 768, 12, 3072, 12, patch_size=32, openai=True, quick_gelu_variant=True),
    KnownTower("ViT-B-16", 768, 12, 3072, 12, patch_size=16, openai=True, quick_gelu_variant=True),
    KnownTower("ViT-B-32-plus", 896, 12, 3584, 14, patch_size=32),
    KnownTower("ViT-B-16-plus", 896, 12, 3584, 14, patch_size=16),
    KnownTower("ViT-L-14", 1024, 24, 4096, 16, patch_size=14, openai=True, quick_gelu_variant=True),
    KnownTower("ViT-L-16", 1024, 24, 4096, 16, patch_size=16),
    KnownTower("ViT-H-14", 1280, 32, 5120, 16, patch_size=14, quick_gelu_variant=True),
    KnownTower("ViT-H-16", 1280, 32, 5120, 16, patch_size=16),
    KnownTower("ViT-g-14", 1408, 40, 6144, 16, patch_size=14),
    KnownTower("ViT-bigG-14", 1664, 48, 8192, 16, patch_size=14, quick_gelu_variant=True),
    KnownTower("ViT-e-14", 1792, 56, 15360, 16, patch_size=14),
)
# Text towers: all use head width 64.
KNOWN_TEXT: tuple[KnownTower, ...] = (
    KnownTower("ViT-S-*-alt", 256, 10, 1024, 4),
    KnownTower("ViT-S / ViT-M-*-alt", 384, 12, 1536, 6),
    KnownTower("ViT-B / ViT-M", 512, 12, 2048, 8, openai=True, quick_gelu_variant=True),
    KnownTower("ViT-B-plus", 640, 12, 2560, 10),
    KnownTower("ViT-L", 768, 12, 3072, 12, openai=True, quick_gelu_variant=True),
    KnownTower("ViT-H / ViT-g", 1024, 24, 4096, 16, quick_gelu_variant=True),
    KnownTower("ViT-bigG", 1280, 32, 5120, 20, quick_gelu_variant=True),
    KnownTower("ViT-e", 1280, 36, 5120, 20),
)


def match_known_image(width: int, layers: int, patch_size: int, mlp_dim: int) -> list[KnownTower]:
    """Known image towers with exactly these shapes (empty: an architecture vidlang does not know)."""
    return [
        k for k in KNOWN_IMAGE if (k.width, k.layers, k.patch_size, k.mlp_dim) == (width, layers, patch_size, mlp_dim)
    ]


def match_known_text(width: int, layers: int, mlp_dim: int) -> list[KnownTower]:
    """Known text towers with exactly these shapes."""
    return [k for k in KNOWN_TEXT if (k.width, k.layers, k.mlp_dim) == (width, layers, mlp_dim)]
