"""Codec encode time of a 512x512 photo crop (1 thread), the eager step reading the written key
slots against the static step over all slots, alternating, same model."""
import functools, sys, time, torch, numpy as np
from PIL import Image
import prior.sampling as sampling
import pipelines.infer.codec as codec
from bench.common import default_other_photos
model = codec.load_codec_model(sys.argv[1])
a = np.asarray(Image.open(default_other_photos()[0]).convert("RGB"))[:512, 44:556]
img = torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()
original = sampling.IncrementalPixelSNAIL
times = {"eager (written slots)": [], "static (all slots)": []}
for r in range(2):
    for name in (list(times) if r % 2 == 0 else list(reversed(times))):
        static = name.startswith("static")
        codec.IncrementalPixelSNAIL = functools.partial(original, static=static)
        t = time.perf_counter(); c = codec.encode_image(model, img, threads=1); times[name].append(time.perf_counter() - t)
        print(name, f"{times[name][-1]:.1f} s", len(c.data), flush=True)
print({k: min(v) for k, v in times.items()})
