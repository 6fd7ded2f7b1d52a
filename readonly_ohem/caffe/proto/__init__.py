"""Caffe's wire-format schema (``caffe.proto``) and its generated module ``caffe_pb2``."""
