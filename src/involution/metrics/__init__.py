"""Evaluation metrics of the dense-prediction tasks.

- :mod:`involution.metrics.coco`: the COCO detection protocol (box and mask AP/AR through
  pycocotools' ``COCOeval``) for torchvision-style predictions.
- :mod:`involution.metrics.segmentation`: per-class IoU, mIoU and pixel accuracy from one
  pixel confusion matrix (torchmetrics), accumulated over batches and DDP ranks.
"""
