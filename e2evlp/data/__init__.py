"""Data: readers for COCO, Visual Genome, VQA v2, NLVR2 and Flickr30K, transforms, collate and synthetic data."""
