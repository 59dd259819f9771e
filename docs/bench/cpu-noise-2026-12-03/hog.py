# memory-bandwidth hog on one core: copy 64 MB back and forth forever (far beyond any cache)
import numpy as np, os
os.sched_setaffinity(0, {1})
a = np.ones(64 * 2**20 // 8); b = np.zeros_like(a)
while True:
    np.copyto(b, a); np.copyto(a, b)
