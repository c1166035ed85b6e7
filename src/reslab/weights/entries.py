"""The catalog's entries: facts (URLs, hashes, published accuracies, preprocessing) about weights
published by torchvision, Keras applications, timm and the best-known CIFAR-10 ResNet repository.

Hashes: torchvision's and akamaster's file names carry the first hex digits of the file's SHA-256
(torch.hub's convention), checked on download; Keras publishes MD5 digests; timm's Hugging Face
files have full SHA-256 digests. Accuracies are the sources' own published top-1/top-5.
"""

from __future__ import annotations

from reslab.weights.catalog import (
    CAFFE_MEAN,
    CAFFE_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
    WeightsEntry,
    register_weights,
)

TV = "https://download.pytorch.org/models/"
TV_LICENCE = "BSD-3-Clause (torchvision; no separate weights licence stated)"
# torchvision's V1 weights: resize 256, crop 224; V2 ("new training recipe"): resize 232, crop 224.
TV1, TV2 = Preprocessing(224, 256), Preprocessing(224, 232)

# name: (file, top1, top5, preprocessing)
_TORCHVISION = {
    "resnet18.tv_in1k": ("resnet18-f37072fd.pth", 0.69758, 0.89078, TV1),
    "resnet34.tv_in1k": ("resnet34-b627a593.pth", 0.73314, 0.91420, TV1),
    "resnet50.tv_in1k": ("resnet50-0676ba61.pth", 0.76130, 0.92862, TV1),
    "resnet50.tv2_in1k": ("resnet50-11ad3fa6.pth", 0.80858, 0.95434, TV2),
    "resnet101.tv_in1k": ("resnet101-63fe2227.pth", 0.77374, 0.93546, TV1),
    "resnet101.tv2_in1k": ("resnet101-cd907fc2.pth", 0.81886, 0.95780, TV2),
    "resnet152.tv_in1k": ("resnet152-394f9c45.pth", 0.78312, 0.94046, TV1),
    "resnet152.tv2_in1k": ("resnet152-f82ba261.pth", 0.82284, 0.96002, TV2),
    "resnext50_32x4d.tv_in1k": ("resnext50_32x4d-7cdf4587.pth", 0.77618, 0.93698, TV1),
    "resnext50_32x4d.tv2_in1k": ("resnext50_32x4d-1a0047aa.pth", 0.81198, 0.95340, TV2),
    "resnext101_32x8d.tv_in1k": ("resnext101_32x8d-8ba56ff5.pth", 0.79312, 0.94526, TV1),
    "resnext101_32x8d.tv2_in1k": ("resnext101_32x8d-110c445d.pth", 0.82834, 0.96228, TV2),
    # torchvision names it IMAGENET1K_V1, but it was trained with the V2 recipe and evaluates at 232.
    "resnext101_64x4d.tv_in1k": ("resnext101_64x4d-173b62eb.pth", 0.83246, 0.96454, TV2),
    "wide_resnet50_2.tv_in1k": ("wide_resnet50_2-95faca4d.pth", 0.78468, 0.94086, TV1),
    "wide_resnet50_2.tv2_in1k": ("wide_resnet50_2-9ba9bcbe.pth", 0.81602, 0.95758, TV2),
    "wide_resnet101_2.tv_in1k": ("wide_resnet101_2-32ee1156.pth", 0.78848, 0.94284, TV1),
    "wide_resnet101_2.tv2_in1k": ("wide_resnet101_2-d733dc28.pth", 0.82510, 0.96020, TV2),
}
for _name, (_file, _top1, _top5, _pre) in _TORCHVISION.items():
    register_weights(WeightsEntry(_name, TV + _file, _file.rsplit("-", 1)[1].split(".")[0], "sha256", "torchvision",
                                  TV_LICENCE, _top1, _top5, _pre, "imagenet1k"))

# Keras applications (converted from the authors' Caffe models): the original v1 blocks (stride in
# the first 1x1 conv), "caffe" input: BGR, minus the mean pixel, unscaled.
KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_CAFFE = Preprocessing(224, 256, mean=CAFFE_MEAN, std=CAFFE_STD)
for _depth, _md5, _top1, _top5 in (("50", "2cb95161c43110f7111970584f804107", 0.749, 0.921),
                                   ("101", "f1aeb4b969a6efcfb50fad2f0c20cfc5", 0.764, 0.928),
                                   ("152", "100835be76be38e30d865e96f2aaae62", 0.766, 0.931)):
    register_weights(WeightsEntry(
        f"resnet{_depth}.keras_in1k", f"{KERAS}resnet{_depth}_weights_tf_dim_ordering_tf_kernels.h5", _md5, "md5",
        "Keras applications", "Apache-2.0 (Keras; weights converted from the authors' Caffe models)",
        _top1, _top5, _CAFFE, "imagenet1k", model_options={"stride_in_1x1": True}, bgr_input=True))

# timm: Wightman et al. 2021, "ResNet strikes back", procedure A1 (top-1 measured at 288 px).
register_weights(WeightsEntry(
    "resnet50.a1_in1k", "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
    "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb", "sha256", "timm", "Apache-2.0",
    0.81214, 0.95102, Preprocessing(224, 235, "bicubic"), "imagenet1k", file_name="resnet50.a1_in1k.safetensors",
    top1_image_size=288))

# Inception: torchvision's ports of Google's TensorFlow weights expect transform_input=True (they were
# trained on inputs in [-1, 1]); timm's take mean = std = 0.5 directly. The torchvision files hold the
# auxiliary heads too; a model built without them drops those tensors (as torchvision does).
register_weights(WeightsEntry(
    "googlenet.tv_in1k", TV + "googlenet-1378be20.pth", "1378be20", "sha256", "torchvision", TV_LICENCE,
    0.69778, 0.89530, TV1, "imagenet1k", model_options={"transform_input": True}))
register_weights(WeightsEntry(
    "inception_v3.tv_in1k", TV + "inception_v3_google-0cc3c7bd.pth", "0cc3c7bd", "sha256", "torchvision",
    TV_LICENCE, 0.77294, 0.93450, Preprocessing(299, 342), "imagenet1k",
    model_options={"transform_input": True}))
for _name, _sha, _top1, _top5, _resize in (
        ("inception_v4", "a756a086851c8d5a8de135ec15c76b90ea56cb5aef450e3299107e659e725bb1", 0.80156, 0.94968, 341),
        ("inception_resnet_v2", "dbea26b13a5fc8351919fed6a94222c0577ce324b2765fd081a798f837ca9d72",
         0.80462, 0.95308, 333)):
    register_weights(WeightsEntry(
        f"{_name}.tf_in1k", f"https://huggingface.co/timm/{_name}.tf_in1k/resolve/main/model.safetensors", _sha,
        "sha256", "timm (ported from TensorFlow)", "Apache-2.0", _top1, _top5,
        Preprocessing(299, _resize, "bicubic", INCEPTION_MEAN, INCEPTION_STD), "imagenet1k",
        file_name=f"{_name}.tf_in1k.safetensors"))

# Idelbayev's pytorch_resnet_cifar10: the paper's CIFAR nets with option A shortcuts, trained on
# 32 px CIFAR-10 normalized with the ImageNet mean and std (its trainer.py), no resize.
AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CIFAR = Preprocessing(32, 32)
for _depth, _hash, _top1 in (
        (20, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 0.9173), (32, "d509ac18", 0.9263),
        (44, "014dd654", 0.9310), (56, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 0.9339),
        (110, "1d1ed7c2", 0.9368), (1202, "f3b1deed", 0.9382)):
    register_weights(WeightsEntry(
        f"resnet{_depth}.akamaster_cifar10", f"{AKAMASTER}resnet{_depth}-{_hash[:8]}.th", _hash, "sha256",
        "akamaster/pytorch_resnet_cifar10", "BSD-2-Clause", _top1, None, _CIFAR, "cifar10",
        model_options={"shortcut": "A"}))
