"""Images -> vectors: reads a catalog of product photos, embeds them with MobileNet,
and keeps the vectors in a FAISS index with product metadata in SQLite."""
