"""Names of the embedding parameters that ``migrate_embeddings`` carries over (2-stage models)."""

from __future__ import annotations

MBLM_TOKEN_EMB_MIGRATION: set[str] = {
    "token_embs_rev.0.embedding.weight",
    "token_embs_rev.1.embedding.weight",
    "to_logits.weight",
    "to_logits.bias",
}
