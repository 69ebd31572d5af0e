"""A tiny byte-level BPE tokenizer with the Gemma 4 special tokens, for the tiny random checkpoints.

Exactly 512 entries (= `vocab_size` of the tiny configs). The Gemma 4 control tokens sit at their real ids
(0-4, 46-52, 98, 100, 101, 105, 106); the multimodal markers sit at the ids the tiny configs remap them to
(500-506). Every other id holds one of the 256 byte-level pieces (in byte order) or a BPE merge trained at
build time on the fixed text below, so any UTF-8 string round-trips and common English/code words are
single tokens. Building takes well under a second and is deterministic.

    tok = build_tiny_tokenizer()            # transformers PreTrainedTokenizerFast
    tok.save_pretrained(path)               # AutoTokenizer.from_pretrained(path) loads it back
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 512

# id -> token text. All are "special": atomic, never split, kept on decode unless skip_special_tokens.
SPECIAL_TOKENS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
    500: "<|image>",
    501: "<image|>",
    502: "<|image|>",
    503: "<|video|>",
    504: "<|audio>",
    505: "<audio|>",
    506: "<|audio|>",
}
TOKEN_IDS: dict[str, int] = {text: i for i, text in SPECIAL_TOKENS.items()}

# Stop tokens of the chat models (generation_config.json `eos_token_id`): <eos>, <turn|>, <|tool_response>.
GENERATION_EOS_IDS: list[int] = [TOKEN_IDS["<eos>"], TOKEN_IDS["<turn|>"], TOKEN_IDS["<|tool_response>"]]

# Multimodal markers, named as transformers' Gemma 4 processor expects them on the tokenizer.
MULTIMODAL_TOKENS: dict[str, str] = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "video_token": "<|video|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}

# Fixed training text for the merges (written for this file). Its word frequencies decide which merges
# exist, so changing it changes the token ids of every tiny checkpoint: do not edit casually.
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the woods.
You are a helpful assistant. The user asks a question and the model answers it in a clear and short way.
What is the weather in Tokyo today? It is sunny and the temperature is 22 degrees. The weather in Paris
is cloudy with a chance of rain. What is the capital of France? The capital of France is Paris.
Please write a function that returns the sum of two numbers. Here is the function you asked for.
The model should think about the problem before it answers. Let me think about this step by step.
First, we read the input. Then we compute the result. Finally, we return the answer to the user.
This is a test of the tokenizer. The tokenizer splits text into tokens, and the model reads the tokens.
Each token has an id. The ids of the special tokens are fixed, and the other ids are learned from text.
The server receives a request, renders the chat template, and sends the prompt to the model.
When the model is done, the server returns the text of the answer and the reason why it stopped.
There are many models in the family: small ones for phones and large ones for servers with many GPUs.
An image is turned into soft tokens, and so is audio. The model can see images and hear sounds.
In the morning the sun rises in the east, and in the evening it sets in the west. Time is short.
We can call a tool to get the weather, and the tool returns a response that the model can use.
The answer is 42. The number of tokens is 512. The time is 10:30 and the date is 2026-11-28.
A chat has turns: a system turn, a user turn and a model turn. The system tells the model what to do,
the user asks, and the model replies. Then the user asks again, and the model replies again.
user: Hello! model: Hi, how can I help you? user: Tell me a joke. model: Why did the user call the tool?
system: Be brief. user: What time is it? model: It is noon. user: Thanks! model: You are welcome.
def add(a, b):
    return a + b

def get_weather(location, unit="celsius"):
    \"\"\"Return the current weather for a location.\"\"\"
    if location is None:
        raise ValueError("location is required")
    result = {"location": location, "temperature": 22, "unit": unit}
    return result

class Model:
    def __init__(self, config):
        self.config = config
        self.layers = []

    def forward(self, input_ids, positions):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, positions)
        return self.norm(hidden)

for i in range(10):
    print(i, i * i)

import json
data = json.loads('{"name": "test", "value": 1, "items": [1, 2, 3]}')
print(data["name"], data["value"], len(data["items"]))
if x > 0 and y < 10:
    x = x - 1
else:
    y = y + 1
while not done:
    done = self.step()
return None
"""


def _trained_merges(num_merges: int) -> list[tuple[str, str]]:
    """Train a byte-level BPE on the fixed text and return its first `num_merges` merges, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    if len(merges) < num_merges:
        raise RuntimeError(f"training text yields only {len(merges)} merges, need {num_merges}")
    return merges[:num_merges]


def _byte_pieces() -> list[str]:
    """The 256 byte-level piece strings (GPT-2 byte→unicode mapping), in byte order 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def build_backend_tokenizer():
    """The raw `tokenizers.Tokenizer` (512 ids, specials registered as atomic special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    free_ids = [i for i in range(VOCAB_SIZE) if i not in SPECIAL_TOKENS]
    pieces = _byte_pieces()
    num_merges = len(free_ids) - len(pieces)
    merges = _trained_merges(num_merges)
    ordered = pieces + [a + b for a, b in merges]
    if len(set(ordered)) != len(ordered):
        raise RuntimeError("duplicate BPE piece")
    vocab = {piece: free_ids[k] for k, piece in enumerate(ordered)}
    vocab.update(TOKEN_IDS)  # specials live in the model vocab at their fixed ids

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(SPECIAL_TOKENS[i], special=True, normalized=False) for i in sorted(SPECIAL_TOKENS)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} entries")
    for i, text in SPECIAL_TOKENS.items():
        if tok.token_to_id(text) != i:
            raise RuntimeError(f"{text} landed at {tok.token_to_id(text)}, expected {i}")
    return tok


def build_tiny_tokenizer(chat_template: str | None = None):
    """A transformers fast tokenizer (`PreTrainedTokenizerFast`); `chat_template` defaults to ours."""
    from transformers import PreTrainedTokenizerFast

    if chat_template is None:
        chat_template = load_chat_template()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        add_bos_token=False,
        add_eos_token=False,
        padding_side="left",
        model_max_length=256,
        extra_special_tokens=dict(MULTIMODAL_TOKENS),
    )
    tok.chat_template = chat_template
    return tok


def save_tiny_tokenizer(out_dir: str | Path, chat_template: str | None = None) -> Path:
    """Write the tokenizer files (and `chat_template.jinja`) into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(chat_template).save_pretrained(out)
    # transformers 5 omits these from tokenizer_config.json; write them so every reader sees them
    # (older transformers and other tools know the class as PreTrainedTokenizerFast).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(add_bos_token=False, add_eos_token=False, tokenizer_class="PreTrainedTokenizerFast")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_chat_template() -> str:
    """Text of `gemma4_chat_template.jinja`, shipped next to this module."""
    return (Path(__file__).with_name("gemma4_chat_template.jinja")).read_text(encoding="utf-8")
