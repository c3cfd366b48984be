"""What an image goes through, defined once for training and serving.

  source file --source_image.process (Pillow; the build, trainer.predict)-->
  stored image --ModelInput.decode--> uint8 [H, W, C]
               --ModelInput.read_resize--> uint8 [h, w, C]
               --ModelInput.to_model--> float32 model input
  (and ModelInput.to_pixels back to [0, 1] pixels for pictures)

source_image.py runs in the Beam build and in trainer.predict; serving/ is
its port to TensorFlow ops for the exported SavedModel, which cannot call
Pillow (serving.preprocess_image: source bytes -> what the model reads).
What both must agree on is defined once, for both: resize_modes.py (each
--resize_mode's Pillow and TensorFlow versions side by side) and
image_formats.py (format signatures, EXIF orientation). model_input.py
(ModelInput) is used by the reader, evaluation, the sample pictures and
the export alike.
"""
