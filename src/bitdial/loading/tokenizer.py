"""Tokenizer: a thin wrapper over `tokenizers`, built from tokenizer.json or from GGUF metadata.

Also holds the chat template (rendered with jinja2, as transformers does) and a streaming decoder that
emits text only once it is complete UTF-8.
"""

from __future__ import annotations

import base64
import json
import logging
import lzma
from datetime import datetime
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from bitdial.errors import ModelFormatError

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> split regexes applied before byte-level BPE.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _byte_level_pre(pre: str):
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "smollm":
        # digits split one by one, then the GPT-2 regex (as SmolLM's tokenizer.json does)
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in ("gpt2", "default", ""):
        log.warning("unknown GGUF pre-tokenizer %r: using the GPT-2 split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _spm_merges(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges for a SentencePiece vocabulary from its piece scores (higher merges first)."""
    merges = []
    for piece, pid in vocab.items():
        if len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((scores[pid], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def tokenizer_from_gguf_fields(fields: dict[str, Any]) -> "Tokenizer":
    """Build a tokenizer from the ``tokenizer.*`` GGUF metadata (already decoded to Python values)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelFormatError("GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
        tok.pre_tokenizer = _byte_level_pre(fields.get("tokenizer.ggml.pre", "gpt2"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[fields.get("tokenizer.ggml.unknown_token_id", 0)]
        tok = HFTokenizer(models.BPE(vocab, _spm_merges(vocab, scores), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
        norms = [normalizers.Replace(" ", "\u2581")]
        if fields.get("tokenizer.ggml.add_space_prefix", True):
            norms.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norms)
        decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if fields.get("tokenizer.ggml.add_space_prefix", True):
            decs.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decs)
    else:
        raise ModelFormatError(
            f"unsupported GGUF tokenizer model {kind!r}; bitdial reads 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE)"
        )
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(special)

    def tid(key):
        v = fields.get(key)
        return None if v is None or v < 0 or v >= len(tokens) else int(v)

    bos = tid("tokenizer.ggml.bos_token_id")
    eos = tid("tokenizer.ggml.eos_token_id")
    stops = [i for i in (eos, tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id"))
             if i is not None]
    return Tokenizer(
        tok,
        bos_id=bos,
        eos_ids=sorted(set(stops)),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=fields.get("tokenizer.chat_template"),
    )


class Tokenizer:
    """Encode/decode text, apply the chat template, and know the special ids."""

    def __init__(self, tok: HFTokenizer, *, bos_id: int | None, eos_ids: Iterable[int],
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """Tokenize ``text``. Special tokens written in the text (e.g. ``<|im_start|>``) are recognized.
        ``bos=None`` prepends BOS only if the model asks for it (``add_bos``)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            # A plain fallback so chat still works with base models.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.token(self.eos_ids[0]) if self.eos_ids else "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.apply_chat_template(messages)
        bos_tok = self.token(self.bos_id) if self.bos_id is not None else None
        # templates that write the BOS token themselves must not get a second one
        add = self.add_bos and not (bos_tok and text.startswith(bos_tok))
        return self.encode(text, bos=add)

    # ---- serialization (artifact metadata, HF directories) ----------------------------------
    def to_json(self) -> dict[str, Any]:
        """JSON-able form; tokenizer.json is stored xz-compressed and base64-encoded (a 49k-token
        vocabulary shrinks from 1.5 MB to about 0.6 MB)."""
        packed = base64.b64encode(lzma.compress(self.tok.to_str().encode("utf-8"))).decode("ascii")
        return {
            "tokenizer_json_xz": packed,
            "bos_id": self.bos_id,
            "eos_ids": self.eos_ids,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tokenizer":
        if "tokenizer_json_xz" in d:
            text = lzma.decompress(base64.b64decode(d["tokenizer_json_xz"])).decode("utf-8")
        else:
            text = d["tokenizer_json"]
        return cls(HFTokenizer.from_str(text), bos_id=d["bos_id"], eos_ids=d["eos_ids"],
                   add_bos=d["add_bos"], chat_template=d.get("chat_template"))

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _raise(msg: str):
    raise ValueError(f"chat template error: {msg}")


def render_chat_template(template: str, messages: list[dict[str, str]], **kwargs: Any) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, **kwargs)
    except jinja2.TemplateError as e:
        raise ModelFormatError(f"the model's chat template failed to render: {e}") from e


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the new text, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.t = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.t.decode(self.ids[self.prefix:self.read])
        after = self.t.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.t.decode(self.ids[self.prefix:self.read])
        after = self.t.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def tokenizer_from_hf_files(tokenizer_json: str, tokenizer_config: dict[str, Any] | None,
                            generation_config: dict[str, Any] | None = None) -> Tokenizer:
    tok = HFTokenizer.from_file(tokenizer_json)
    cfg = tokenizer_config or {}

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    def tid(name):
        s = content(cfg.get(name))
        return tok.token_to_id(s) if s else None

    bos = tid("bos_token")
    eos = [i for i in [tid("eos_token")] if i is not None]
    gen_eos = (generation_config or {}).get("eos_token_id")
    if gen_eos is not None:
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    # tokenizer.json may carry its own BOS post-processor; we add BOS ourselves, so encode without it
    add_bos = bool(cfg.get("add_bos_token", False))
    return Tokenizer(tok, bos_id=bos, eos_ids=sorted(set(eos)), add_bos=add_bos, chat_template=template)
