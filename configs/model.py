"""BERT architectures by name: the full-precision teacher and the 1-bit BiPFT student.

`get_config("SIZE[,VARIANT]")` gives the fields of `bipft_jax.model.BertConfig`, so
`BertConfig.from_dict(get_config("base"))` builds the model. Sizes: tiny, mini, small, medium
(Google's BERT miniatures), base, large, and minilm-l6 (all-MiniLM-L6-v2, our real pretrained
FP checkpoint). Variants: `fp` (the default: a teacher), `binary` (the BiPFT student, rank-1
residual estimators), `bipft_a` (the student without estimators, the paper's BiPFT-A).

On the command line of a job that takes a model config, with any field overridden:

  --config configs/model.py:base,binary --config.num_layers=6

and in Python:

  from bipft_jax import config_loading, model
  config = model.BertConfig.from_dict(config_loading.load_config("configs/model.py:base,bipft_a"))
"""
import ml_collections

# name -> (layers, hidden, heads, FFN). FFN is 4 x hidden except where a released model says otherwise.
SIZES = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "medium": (8, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
    "minilm-l6": (6, 384, 12, 1536),
}
VARIANTS = ("fp", "binary", "bipft_a")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is "SIZE[,VARIANT]" (default "base,fp"); see the module docstring."""
  size, variant = "base", "fp"
  for token in (arg or "").replace(" ", "").split(","):
    if token in SIZES:
      size = token
    elif token in VARIANTS:
      variant = token
    elif token:
      raise ValueError(f"unknown model size or variant {token!r}; sizes: {', '.join(SIZES)}; "
                       f"variants: {', '.join(VARIANTS)}")
  layers, hidden, heads, ffn = SIZES[size]
  binary = variant != "fp"

  c = ml_collections.ConfigDict()
  c.vocab_size = 30522             # BERT's uncased WordPiece vocab, as in every released size here
  c.hidden_size = hidden
  c.num_layers = layers
  c.num_heads = heads
  c.intermediate_size = ffn
  c.max_position_embeddings = 512  # BERT's; pretraining uses shorter sequences, checkpoints keep 512 rows
  c.type_vocab_size = 2            # segment A / B for NSP and sentence-pair GLUE tasks
  c.layer_norm_eps = 1e-12         # BERT's value; 1e-5 would change imported teachers' outputs
  c.hidden_dropout = 0.1
  c.attention_dropout = 0.1
  c.classifier_dropout = 0.1
  c.num_labels = 2                 # finetuning sets it per task; 1 means regression (STS-B)
  c.pad_token_id = 0               # [PAD] in the uncased vocab
  # The release's student config sets hidden_act=relu, which reaches only the MLM transform.
  c.mlm_transform_act = "relu" if binary else "gelu"
  c.binary = binary                # 1-bit weights, embeddings and activations (METHOD.md section 3)
  c.estimator_rank = 0 if variant == "bipft_a" else 1  # low-rank residual estimators; 0 = BiPFT-A
  c.weight_binarizer = "bwn"       # sign(W) times mean |W|: the release's weight quantizer
  c.activation_binarizer = "elastic"  # the release's BiT quantizer: one learned scale per tensor, LSQ grads
  # The binarized Linear layers' operator: "bipft" (the release: BWN weights, elastic inputs with a move
  # bias) or a zoo operator (bnn, xnor, xnorplusplus, dorefa, bireal, react, recu, fda; bipft_jax/zoo).
  c.linear_binarizer = "bipft"
  # The attention probabilities' binarizer: "elastic" (the release: alpha * [p >= alpha / 2], alpha
  # learned) or "bivit" (BiViT's softmax-aware [p >= max_row(p) / 4]).
  c.attention_prob_binarizer = "elastic"
  c.matmul_precision = "highest"   # default CPU/TPU fp32 matmuls round to bf16 and flip signs
  c.binary_matmul_dtype = "auto"   # sign products: the host's fastest exact one of float32, bfloat16, int8
  c.precision = "fp32"             # "mixed": FP matmuls (teacher too) in bf16, fp32 accumulation and weights
  c.pooling = "cls"                # the pooler's input: the [CLS] state (BERT) or "mean" over real tokens
  c.remat = False                  # recompute each layer's activations in the backward: less memory, ~1 forward more
  return c
