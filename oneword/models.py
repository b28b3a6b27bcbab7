"""Load a frozen latent diffusion model and splice placeholder tokens into its text encoder(s).

One :class:`FrozenLDM` describes any supported model: SD 1.x (one CLIP-L text encoder, 768 wide),
SD 2.x (OpenCLIP-H, 1024, often v-prediction), SDXL (two encoders, 768 + 1280, pooled embeddings
and time ids) and the bundled toy model. The rest of the package reads the family, widths and
prediction type from it and never branches on where the model came from.

Placeholder tokens are added to the tokenizer(s) and served by :class:`PlaceholderEmbedding`, which
wraps the untouched vocabulary table: rows below the original vocabulary size come from it, the new
ids come from a small fp32 ``nn.Parameter``. The vocabulary matrix is never resized, never copied
and never seen by an optimizer.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from oneword.errors import ModelLoadError, TokenError

logger = logging.getLogger(__name__)

Family = Literal["sd1", "sd2", "sdxl", "toy"]

#: Hub ids of the presets. They load from the Hugging Face cache, or download where a network is.
PRESETS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
#: Entry-point group of presets that are local diffusers folders: each entry is a callable
#: ``(name) -> Path``. The package registers ``toy`` (the shipped toy world) and ``tiny-sd1``,
#: ``tiny-sd2``, ``tiny-sdxl`` (miniature random models) in pyproject.toml; other packages may add theirs.
PRESET_GROUP = "oneword.presets"
FAMILY_FILE = "oneword.json"  # optional marker in a diffusers folder: {"family": "toy"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None = None) -> torch.device:
    """``cuda`` if available, else Apple ``mps``, else ``cpu`` (or the one asked for)."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA by default (the frozen weights only; learned vectors stay fp32), else fp32."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class PlaceholderEmbedding(nn.Module):
    """Token embedding = frozen vocabulary table + a small table of new, trainable vectors.

    Ids ``< base.num_embeddings`` read the original table; id ``base.num_embeddings + k`` reads
    ``vectors[k]``. ``batch_vectors`` (``[batch, k, width]``), when set, replaces ``vectors`` per
    sample: the encoder's training step feeds a different predicted concept to each sample.
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        # A child registered after ``base``: ``model.dtype`` (the first parameter's) keeps reporting
        # the frozen weights' dtype, not the fp32 of the learned vectors.
        self.store = nn.Module()
        self.store.vectors = nn.Parameter(torch.zeros(0, base.embedding_dim), requires_grad=False)
        self.batch_vectors: torch.Tensor | None = None

    @property
    def vectors(self) -> nn.Parameter:
        """The new tokens' vectors, ``[k, width]`` fp32."""
        return self.store.vectors

    @property
    def first_new_id(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:  # code that inspects ``get_input_embeddings().weight``
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def grow(self, rows: torch.Tensor) -> None:
        """Append new vectors (``[k, width]``) for freshly added tokens."""
        data = torch.cat([self.vectors.data, rows.to(self.vectors.device, torch.float32)])
        self.store.vectors = nn.Parameter(data, requires_grad=self.vectors.requires_grad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        out = self.base(input_ids.masked_fill(is_new, 0))
        if not bool(is_new.any()):
            return out
        new_idx = (input_ids - self.first_new_id).clamp(min=0)
        if self.batch_vectors is not None:
            table = self.batch_vectors
            rows = table[torch.arange(table.shape[0], device=table.device)[:, None], new_idx]
        else:
            rows = self.vectors[new_idx]
        return torch.where(is_new[..., None], rows.to(out.dtype), out)


@dataclass
class TextConditioning:
    """What the UNet is conditioned on: token states, plus pooled embeddings for SDXL."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


def _rows(emb, ids: list[int]) -> torch.Tensor:
    """Rows of ``emb.vectors`` (a placeholder embedding's new vectors) holding token ``ids``."""
    return (torch.tensor(ids) - emb.first_new_id).to(emb.vectors.device)


@dataclass
class FrozenLDM:
    """A loaded diffusion model, frozen, with everything the inversion needs to know about it."""

    family: Family
    pipeline: object  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    source: str
    device: torch.device
    dtype: torch.dtype
    placeholder_tokens: dict[str, int] = field(default_factory=dict)  # token -> vectors
    _clean_tokenizers: dict[str, object] | None = field(default=None, repr=False)  # as loaded, by attribute

    @property
    def tokenizers(self) -> list:
        toks = [self.pipeline.tokenizer, getattr(self.pipeline, "tokenizer_2", None)]
        return [t for t in toks if t is not None]

    @property
    def text_encoders(self) -> list[nn.Module]:
        encs = [self.pipeline.text_encoder, getattr(self.pipeline, "text_encoder_2", None)]
        return [e for e in encs if e is not None]

    @property
    def unet(self) -> nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def widths(self) -> list[int]:
        return [int(e.config.hidden_size) for e in self.text_encoders]

    @property
    def prediction_type(self) -> str:
        return str(self.pipeline.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image size: UNet sample size times the VAE's downsampling factor."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def describe(self) -> str:
        widths = "+".join(str(w) for w in self.widths)
        dtype = {v: k for k, v in DTYPES.items()}[self.dtype]
        return (
            f"{self.source}: family={self.family} text-encoder width={widths} "
            f"prediction={self.prediction_type} resolution={self.resolution} "
            f"device={self.device.type} dtype={dtype}"
        )

    # ----------------------------------------------------------------- placeholder tokens
    def placeholder_embeddings(self) -> list[PlaceholderEmbedding]:
        """The wrapper of each text encoder's token table, installed on first use."""
        out = []
        for enc in self.text_encoders:
            emb = enc.get_input_embeddings()
            if not isinstance(emb, PlaceholderEmbedding):
                emb = PlaceholderEmbedding(emb)
                emb.to(self.device)
                enc.set_input_embeddings(emb)
            out.append(emb)
        return out

    def token_ids(self, token: str) -> list[list[int]]:
        """Ids of a placeholder's vectors in each tokenizer (``token``, ``token_1``, ...)."""
        names = expand_token(token, self.placeholder_tokens[token])
        return [tok.convert_tokens_to_ids(names) for tok in self.tokenizers]

    def add_placeholder(self, token: str, init_vectors: list[torch.Tensor]) -> None:
        """Add ``token`` (``n`` vectors) to every tokenizer and text encoder.

        ``init_vectors`` holds one ``[n, width]`` tensor per text encoder.
        """
        validate_token(token, self.tokenizers[0], existing=self.placeholder_tokens)
        if self._clean_tokenizers is None:
            self._clean_tokenizers = {
                attr: copy.deepcopy(tok)
                for attr in ("tokenizer", "tokenizer_2")
                if (tok := getattr(self.pipeline, attr, None)) is not None
            }
        n = int(init_vectors[0].shape[0])
        names = expand_token(token, n)
        for tok, emb, vecs in zip(self.tokenizers, self.placeholder_embeddings(), init_vectors):
            if vecs.shape != (n, emb.embedding_dim):
                raise ValueError(f"vectors {tuple(vecs.shape)} do not fit ({n}, {emb.embedding_dim})")
            tok.add_tokens(names)
            ids = tok.convert_tokens_to_ids(names)
            expected = list(
                range(emb.first_new_id + emb.vectors.shape[0], emb.first_new_id + emb.vectors.shape[0] + n)
            )
            if ids != expected:  # the tokenizer and the wrapper must agree on new ids
                raise RuntimeError(f"tokenizer gave ids {ids} for {names}, expected {expected}")
            emb.grow(vecs)
        self.placeholder_tokens[token] = n

    def clear_placeholders(self) -> None:
        """Remove every placeholder token: the tokenizers and token tables are as loaded again, and
        the UNet's gradient checkpointing (an inversion setting) is off, so the next concept's
        inversion reuses this model instead of loading another copy."""
        if self._clean_tokenizers is not None:
            for attr, clean in self._clean_tokenizers.items():
                setattr(self.pipeline, attr, copy.deepcopy(clean))
        if getattr(self.unet, "is_gradient_checkpointing", False):
            self.unet.disable_gradient_checkpointing()
        for emb in self.placeholder_embeddings():
            emb.store.vectors = nn.Parameter(emb.vectors.data[:0].clone(), requires_grad=False)
        self.placeholder_tokens.clear()

    def trainable_vectors(self) -> list[nn.Parameter]:
        """The new vectors of each text encoder as parameters (everything else stays frozen)."""
        params = []
        for emb in self.placeholder_embeddings():
            emb.vectors.requires_grad_(True)
            params.append(emb.vectors)
        return params

    def vectors_of(self, token: str) -> list[torch.Tensor]:
        """Current fp32 vectors of ``token``: one ``[n, width]`` tensor per text encoder."""
        return [
            emb.vectors.detach()[_rows(emb, ids)].float().cpu().clone()
            for emb, ids in zip(self.placeholder_embeddings(), self.token_ids(token))
        ]

    def placeholder_tables(
        self, words: Sequence[Mapping[str, Sequence[torch.Tensor]]], repeats: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """``batch_vectors`` for :meth:`encode_text`: per text encoder, a ``[samples, new tokens,
        width]`` table. Row group ``i`` (``repeats[i]`` samples, default 1) reads the stored vectors,
        except for the placeholders named in ``words[i]``, which read the vectors given there (one
        ``[n, width]`` tensor per text encoder; gradients flow through them). This is how several
        concepts share one forward pass without any of them being stored in the model."""
        out = []
        for j, emb in enumerate(self.placeholder_embeddings()):
            base = emb.vectors.detach()
            tables = []
            for i, given in enumerate(words):
                table = base
                for token, vectors in given.items():
                    rows = _rows(emb, self.token_ids(token)[j])
                    table = table.index_put((rows,), vectors[j].to(base.device, base.dtype))
                tables.append(table.unsqueeze(0).expand(repeats[i] if repeats else 1, -1, -1))
            out.append(torch.cat(tables))
        return out

    def set_vectors(self, token: str, vectors: list[torch.Tensor]) -> None:
        """Overwrite ``token``'s vectors (one ``[n, width]`` tensor per text encoder, as
        :meth:`vectors_of` returns them)."""
        for emb, ids, vecs in zip(self.placeholder_embeddings(), self.token_ids(token), vectors, strict=True):
            if vecs.shape != (len(ids), emb.embedding_dim):
                raise ValueError(f"vectors {tuple(vecs.shape)} do not fit ({len(ids)}, {emb.embedding_dim})")
            with torch.no_grad():
                emb.vectors[_rows(emb, ids)] = vecs.to(emb.vectors.device, emb.vectors.dtype)

    def expand_prompt(self, prompt: str) -> str:
        """``"a <cat> toy"`` -> ``"a <cat> <cat>_1 <cat>_2 toy"`` for a 3-vector token.

        Matched as the tokenizer matches added tokens: in one pass, longest name first (so ``<cat>``
        is not expanded inside ``<cat>-red``) and ignoring case (CLIP lower-cases the prompt, so
        ``<MyCat>`` and ``<mycat>`` are one token)."""
        if all(n == 1 for n in self.placeholder_tokens.values()):
            return prompt
        by_name = {t.lower(): t for t in self.placeholder_tokens}
        names = sorted(self.placeholder_tokens, key=len, reverse=True)

        def expand(match: re.Match) -> str:
            token = by_name[match.group(0).lower()]
            n = self.placeholder_tokens[token]
            return " ".join(expand_token(token, n)) if n > 1 else match.group(0)

        return re.sub("|".join(map(re.escape, names)), expand, prompt, flags=re.IGNORECASE)

    def initializer_vectors(self, words: str, num_vectors: int) -> list[torch.Tensor]:
        """Start vectors from the initializer word(s), per text encoder.

        One vector: the mean of the words' token embeddings (so ``"sleeping cat"`` works). Several
        vectors: the words' tokens in turn, cycled if there are fewer tokens than vectors.
        """
        out = []
        for tok, emb in zip(self.tokenizers, self.placeholder_embeddings()):
            ids = tok(words, add_special_tokens=False).input_ids
            if not ids:
                raise TokenError(f"initializer {words!r} has no tokens; give a word such as 'dog'")
            with torch.no_grad():
                table = emb.base.weight[torch.tensor(ids, device=emb.base.weight.device)].float().cpu()
            if num_vectors == 1:
                out.append(table.mean(0, keepdim=True))
            else:
                out.append(torch.stack([table[i % len(ids)] for i in range(num_vectors)]))
        return out

    # ----------------------------------------------------------------- text conditioning
    def encode_text(
        self, prompts: list[str], batch_vectors: list[torch.Tensor] | None = None
    ) -> TextConditioning:
        """Encode prompts (placeholders expanded) the way the model's pipeline does.

        ``batch_vectors`` (one ``[batch, k, width]`` tensor per encoder) substitutes every
        placeholder vector per sample; otherwise the stored vectors are used.
        """
        prompts = [self.expand_prompt(p) for p in prompts]
        embs = self.placeholder_embeddings() if (self.placeholder_tokens or batch_vectors) else []
        states, pooled = [], None
        try:
            for i, (tok, enc) in enumerate(zip(self.tokenizers, self.text_encoders)):
                if batch_vectors is not None:
                    embs[i].batch_vectors = batch_vectors[i]
                ids = tok(
                    prompts,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                out = enc(ids, output_hidden_states=self.is_sdxl)
                if self.is_sdxl:  # SDXL conditions on the penultimate layer of both encoders
                    states.append(out.hidden_states[-2])
                    if i == 1:
                        pooled = out.text_embeds
                else:
                    states.append(out.last_hidden_state)
        finally:
            for emb in embs:
                emb.batch_vectors = None
        return TextConditioning(torch.cat(states, dim=-1), pooled)


def expand_token(token: str, n: int) -> list[str]:
    """Tokenizer names of a token's vectors, diffusers' convention: ``t, t_1, ..., t_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def validate_token(token: str, tokenizer, existing: dict[str, int] | None = None) -> None:
    """Reject names that are empty, contain spaces, already exist, or would split other words.

    Added tokens are matched inside any text, so a name like ``art`` would cut ``party`` into
    ``p art y``; the name must therefore not occur inside any vocabulary entry.
    """
    hint = "pick a distinctive name such as '<my-cat>'"
    if not token or any(c.isspace() for c in token):
        raise TokenError(f"placeholder token {token!r} must be one word without spaces; {hint}")
    low = token.lower()
    if any(low == t.lower() for t in existing or {}):
        raise TokenError(
            f"placeholder token {token!r} is already in use (tokens ignore case); give this one another name"
        )
    vocab, text = _vocab_index(tokenizer)
    if low in vocab or f"{low}</w>" in vocab:
        raise TokenError(f"placeholder token {token!r} is already a word of the vocabulary; {hint}")
    if low in text:  # one entry per line, and the name has no line break: a hit lies in one entry
        clash = next(w for w in vocab if low in w.removesuffix("</w>"))
        raise TokenError(
            f"placeholder token {token!r} occurs inside the vocabulary entry {clash!r} and would "
            f"split ordinary words; {hint}"
        )


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_index(tokenizer) -> tuple[dict[str, int], str]:
    """A tokenizer's vocabulary and its entries (end-of-word mark removed) as one text, one entry
    per line, made again only when the tokenizer's size changes (a service checks every request's
    token against the same tokenizer)."""
    size = len(tokenizer)
    known = _VOCABS.get(tokenizer)
    if known is None or known[0] != size:
        vocab = tokenizer.get_vocab()
        known = (size, vocab, "\n".join(w.removesuffix("</w>") for w in vocab))
        _VOCABS[tokenizer] = known
    return known[1], known[2]


# --------------------------------------------------------------------- loading
def _quiet_libraries() -> None:
    """diffusers and transformers print per-component loading bars and config nags; we log instead."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _detect_family(pipe, folder: Path | None) -> Family:
    if folder is not None and (folder / FAMILY_FILE).is_file():
        fam = json.loads((folder / FAMILY_FILE).read_text()).get("family")
        if fam in ("sd1", "sd2", "sdxl", "toy"):
            return fam
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


def _not_available(name: str, repo: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} ({repo}) is not in the Hugging Face cache and could not be downloaded "
        f"({type(err).__name__}); run `huggingface-cli download {repo}` where the hub is reachable, "
        "or pass a local diffusers folder or .safetensors checkpoint to --model"
    )


def _from_pretrained(where: str, dtype: torch.dtype, local_only: bool):
    from diffusers import DiffusionPipeline

    # ``torch_dtype`` works on every supported diffusers release (newer ones prefer ``dtype``).
    kwargs = {"torch_dtype": dtype, "local_files_only": local_only}
    if dtype == torch.float16 and not Path(where).exists():
        kwargs["variant"] = "fp16"
        try:
            return DiffusionPipeline.from_pretrained(where, **kwargs)
        except (OSError, ValueError):
            kwargs.pop("variant")
    return DiffusionPipeline.from_pretrained(where, **kwargs)


def _single_file_family(path: Path) -> Family:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError(f"{path} is not a Stable Diffusion 1.x/2.x/XL checkpoint (unknown layout)")


def _load_single_file(path: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelLoadError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
            ".safetensors with a tool you trust and pass that file instead"
        )
    family = _single_file_family(path)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(path), torch_dtype=dtype)
    except Exception as err:  # diffusers fetches component configs from the hub
        raise ModelLoadError(
            f"could not load {path} as a single-file {family} checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); convert it to a diffusers folder or make the "
            "base model's configs available in the Hugging Face cache"
        ) from err
    return pipe, family


def folder_presets() -> dict:
    """The registered presets that are local folders, by name (entry points of :data:`PRESET_GROUP`)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PRESET_GROUP)}


def load_model(
    model: str, *, device: str | None = None, dtype: str | None = None, family: Family | None = None
) -> FrozenLDM:
    """Load ``model`` frozen: a preset (``sd15``, ``sd21``, ``sdxl``, ``toy``, ``tiny-sd1`` ...),
    a diffusers folder, a single-file ``.safetensors`` checkpoint, or a hub id.
    """
    _quiet_libraries()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    folder: Path | None = None
    path = Path(os.path.expanduser(model))
    local = folder_presets()
    if model in local:
        folder = Path(local[model].load()(model))
        pipe = _from_pretrained(str(folder), torch_dtype, True)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
        folder = path
        pipe = _from_pretrained(str(path), torch_dtype, True)
    elif path.is_file():
        pipe, family = _load_single_file(path, torch_dtype)
    elif model in PRESETS or "/" in model:
        repo = PRESETS.get(model, model)
        try:
            pipe = _from_pretrained(repo, torch_dtype, True)
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
                raise _not_available(model, repo, OSError("HF_HUB_OFFLINE is set")) from None
            try:
                pipe = _from_pretrained(repo, torch_dtype, False)
            except Exception as err:
                raise _not_available(model, repo, err) from err
    else:
        choices = ", ".join([*PRESETS, *local])
        raise ModelLoadError(
            f"--model {model!r} is neither a preset ({choices}) nor an existing folder or file"
        )
    pipe.to(dev)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    ldm = FrozenLDM(family or _detect_family(pipe, folder), pipe, model, dev, torch_dtype)
    if ldm.family != "toy" and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()  # decode a batch one image at a time: SDXL's VAE at 1,024 px is the peak
    logger.info("loaded %s", ldm.describe())
    return ldm
