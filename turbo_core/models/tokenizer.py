"""The umT5 tokenizer, always from local files: finding it, loading it, and cleaning prompts.

Where the tokenizer comes from, in this order:
  (a) the `spiece_model` tensor embedded in the text encoder file (ComfyUI's convention: a
      uint8 tensor holding a serialized SentencePiece model);
  (b) an explicit path: a spiece.model / tokenizer.json file, or a folder holding one;
  (c) discovery beside the model file and in a `text_encoders/` folder up the tree.
Nothing here ever contacts a model hub.

umT5's special tokens: <pad> = 0, </s> = 1, <unk> = 2, no BOS. A prompt becomes
`clean(prompt)` pieces + `</s>`, padded with 0 to 512 tokens.
"""
from __future__ import annotations

import html
import io
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from turbo_core.io.checkpoint import CheckpointError

log = logging.getLogger("turbo_core")

TEXT_LEN = 512
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# Folder names a downloaded google/umt5-xxl tokenizer is usually kept under.
TOKENIZER_DIRS = ("umt5-xxl", "umt5_xxl", "google/umt5-xxl", "google_umt5-xxl", "tokenizer")
HF_CACHE_DIR = "models--google--umt5-xxl"
EMBEDDED_KEY = "spiece_model"


class TokenizerNotFound(CheckpointError):
    """No umT5 tokenizer where we looked; the message says which file to put where."""


# ---------------------------------------------------------------------------
# Prompt cleaning (the official pipeline's "whitespace" cleaning)

def clean_prompt(text: str) -> str:
    """ftfy repair, HTML entities decoded twice, whitespace runs collapsed, ends stripped."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------
# The tokenizer object

class UMT5Tokenizer:
    """Prompts -> (ids, mask) the way the official umT5 pipeline makes them."""

    def __init__(self, backend, source: str):
        self._backend = backend
        self.source = source  # where it was loaded from, for messages
        self.vocab_size: int = backend.vocab_size
        self.eos_id: int = backend.eos_id
        self.pad_id: int = backend.pad_id if backend.pad_id is not None and backend.pad_id >= 0 else 0

    def __repr__(self):
        return f"UMT5Tokenizer({self.source}, {self.vocab_size} pieces, eos={self.eos_id}, pad={self.pad_id})"

    def encode_text(self, text: str) -> list[int]:
        """Piece ids of the cleaned text, without </s>."""
        return list(self._backend.encode(clean_prompt(text)))

    def __call__(self, prompts, text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: [B, text_len] int64 each; </s> last, truncated to text_len, padded with pad_id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            pieces = self.encode_text(prompt)
            total = len(pieces) + 1  # + </s>
            if total > text_len:
                warnings.warn(
                    f"prompt {row} is {total} tokens long (with </s>); umT5 reads only {text_len}, "
                    f"so its last {total - text_len} tokens are dropped",
                    stacklevel=2,
                )
                pieces = pieces[: text_len - 1]  # keep </s> as the last token, like HF truncation
            tokens = pieces + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


class _SentencePieceBackend:
    def __init__(self, proto: bytes, what: str):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, TypeError, OSError) as err:
            raise CheckpointError(f"{what} is not a valid SentencePiece model ({err})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        if self.eos_id < 0:
            raise CheckpointError(f"{what} has no </s> token, so it is not the umT5 tokenizer")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)


class _HFTokenizersBackend:
    """tokenizer.json through the `tokenizers` library (a local file only, never a hub id)."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CheckpointError(
                f"{path} needs the `tokenizers` package (pip install tokenizers), "
                f"or use spiece.model from google/umt5-xxl instead"
            ) from None
        try:
            self.tk = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({err})") from None
        # We pad and truncate ourselves; a tokenizer.json may carry its own settings.
        self.tk.no_padding()
        self.tk.no_truncation()
        self.vocab_size = self.tk.get_vocab_size()
        self.eos_id = self.tk.token_to_id("</s>")
        self.pad_id = self.tk.token_to_id("<pad>")
        if self.eos_id is None:
            raise CheckpointError(f"{path} has no </s> token, so it is not the umT5 tokenizer")

    def encode(self, text: str) -> list[int]:
        # No special tokens: T5's tokenizer.json appends </s> itself, and we add it in __call__.
        return self.tk.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------
# Loading from each kind of source

def tokenizer_from_bytes(proto: bytes | torch.Tensor, source: str = "embedded spiece_model") -> UMT5Tokenizer:
    """A serialized SentencePiece model (bytes, or ComfyUI's uint8 tensor)."""
    if isinstance(proto, torch.Tensor):
        proto = proto.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes()
    return UMT5Tokenizer(_SentencePieceBackend(proto, source), source)


def tokenizer_from_path(path: str | os.PathLike) -> UMT5Tokenizer:
    """A spiece.model / *.model / tokenizer.json file, or a folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = _tokenizer_file_in(path)
        if found is None:
            raise TokenizerNotFound(
                f"tokenizer folder {path} holds neither spiece.model nor tokenizer.json; "
                f"put spiece.model from google/umt5-xxl there"
            )
        path = found
    if not path.is_file():
        raise TokenizerNotFound(f"tokenizer {path} does not exist; point it at spiece.model (from google/umt5-xxl)")
    if path.suffix == ".json":
        return UMT5Tokenizer(_HFTokenizersBackend(path), str(path))
    return UMT5Tokenizer(_SentencePieceBackend(path.read_bytes(), str(path)), str(path))


def _tokenizer_file_in(folder: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def tokenizer_search_dirs(model_path: str | os.PathLike) -> list[Path]:
    """Folders auto-discovery looks in, nearest first."""
    model_path = Path(model_path).expanduser().absolute()
    names = TOKENIZER_DIRS + (model_path.stem,)

    def around(folder: Path) -> list[Path]:
        dirs = [folder] + [folder / n for n in names]
        # A Hugging Face cache: models--google--umt5-xxl/snapshots/<hash>/
        dirs += sorted((folder / HF_CACHE_DIR / "snapshots").glob("*"))
        return dirs

    # The folder as given, and where a symlinked model file really lives.
    heres = [model_path.parent, model_path.resolve().parent]
    dirs = around(heres[0]) + around(heres[1])
    # ComfyUI keeps text encoders in models/text_encoders (older: models/clip); look there too.
    for here in heres:
        for parent in [here, *here.parents][:6]:
            for te in (parent, parent / "text_encoders"):
                if te.name == "text_encoders" and te.is_dir():
                    dirs += around(te)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_tokenizer_file(model_path: str | os.PathLike) -> Path | None:
    for folder in tokenizer_search_dirs(model_path):
        found = _tokenizer_file_in(folder)
        if found is not None:
            return found
    return None


def missing_tokenizer_message(model_path: str | os.PathLike | None) -> str:
    if model_path is None:
        return (
            "no umT5 tokenizer: pass tokenizer=<path to spiece.model or tokenizer.json from google/umt5-xxl>, "
            "or use a text encoder file that embeds it (a `spiece_model` tensor, as in Comfy-Org's "
            "umt5_xxl_fp8_e4m3fn_scaled.safetensors)"
        )
    model_path = Path(model_path).expanduser().absolute()
    target = model_path.parent / "umt5-xxl"
    return (
        f"no umT5 tokenizer for {model_path.name}: the file does not embed one (no `spiece_model` tensor) "
        f"and none was found beside it. Put spiece.model (from the Hugging Face repo google/umt5-xxl) in "
        f"{target}{os.sep}, or pass tokenizer=<path to spiece.model or tokenizer.json>, or use a text encoder "
        f"file that embeds the tokenizer (Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled.safetensors). "
        f"Looked for {' / '.join(TOKENIZER_FILES)} in: "
        + ", ".join(str(d) for d in tokenizer_search_dirs(model_path) if d.is_dir())
    )


def load_tokenizer(
    model_path: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | UMT5Tokenizer | None = None,
    *,
    embedded: torch.Tensor | bytes | None = None,
) -> UMT5Tokenizer:
    """The umT5 tokenizer from (a) `embedded`, (b) `tokenizer`, (c) files near `model_path`."""
    if embedded is not None:
        if tokenizer is not None:
            log.info("umT5: using the tokenizer embedded in the model file; tokenizer=%s is not needed", tokenizer)
        return tokenizer_from_bytes(embedded)
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return tokenizer_from_path(tokenizer)
    found = find_tokenizer_file(model_path) if model_path is not None else None
    if found is None:
        raise TokenizerNotFound(missing_tokenizer_message(model_path))
    log.info("umT5: tokenizer %s", found)
    return tokenizer_from_path(found)


# ---------------------------------------------------------------------------
# A real (tiny) SentencePiece model, built offline, for tests and demos

_TINY_CORPUS = """\
A small orange cat sleeps on a wooden windowsill while rain taps softly against the glass.
A red fox runs across a snowy field at dawn, its breath rising in little white clouds.
Two astronauts walk slowly over the grey surface of the moon as the blue earth hangs above them.
A busy city street at night, neon signs reflecting in puddles while yellow taxis drive past.
An old fisherman pulls his net from the calm sea, gulls circling over the boat in the golden light.
A young woman in a long green coat walks through an autumn forest, leaves falling around her.
A dog on a skateboard rolls down a sunny sidewalk, ears flapping in the wind.
Waves crash against black rocks under a stormy sky, and lightning flashes far out over the water.
A hot air balloon drifts above green hills and a winding river early in the morning.
A chef slices fresh vegetables in a bright kitchen, steam rising from a pot on the stove.
A child builds a sandcastle on the beach while the tide slowly comes in.
A train crosses a tall stone bridge in the mountains, smoke trailing behind it.
A panda eats bamboo in a quiet bamboo grove, sunlight filtering through the leaves.
The camera slowly pans across a field of sunflowers swaying in a warm summer breeze.
A close up of a hummingbird hovering beside a red flower, its wings a blur.
A robot waters plants in a glass greenhouse full of tomatoes and tall green beans.
Snow falls on a small village at night, warm light glowing in every window.
A surfer rides a huge blue wave, spray flying as the sun sets behind the ocean.
An elephant family walks across the dry savanna toward a distant watering hole.
A cup of coffee on a cafe table, the city moving in a soft blur outside the window.
A drone shot flies over a dense jungle and reveals a tall waterfall hidden in the trees.
A knight in shining armor rides a white horse through the gate of an ancient castle.
Fireworks burst over a harbor, their colors reflected in the dark still water.
A turtle swims through a bright coral reef, small fish darting around it.
A man plays the violin on a street corner while people stop to listen and smile.
Cinematic lighting, high detail, smooth camera motion, realistic textures, shallow depth of field.
"""


def train_tiny_sentencepiece(out_dir: str | os.PathLike, vocab_size: int = 256, model_type: str = "unigram") -> Path:
    """Train a tiny SentencePiece model with umT5's special-token layout; returns out_dir/spiece.model.

    <pad> = 0, </s> = 1, <unk> = 2, no BOS (like google/umt5-xxl). The corpus is a fixed
    embedded text, so the result is the same on every run. Takes well under a second.
    """
    import sentencepiece

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may not support the full vocab_size
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / "spiece.model"
    path.write_bytes(model.getvalue())
    return path
