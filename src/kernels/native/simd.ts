/**
 * The native backend's WebAssembly SIMD loops: simd-wat.ts assembled by wabt once per process,
 * instantiated once per thread (each thread its own memory; workers get the compiled module).
 */
import wabtInit from 'wabt';
import type { SimdLoops } from './loops.js';
import { SIMD_WAT } from './simd-wat.js';

let assembled: Promise<WebAssembly.Module | null> | undefined;

/** The compiled module; null where this engine has no WebAssembly SIMD. */
export function simdModule(): Promise<WebAssembly.Module | null> {
  assembled ??= (async () => {
    const wabt = await wabtInit();
    const parsed = wabt.parseWat('native-simd.wat', SIMD_WAT, { simd: true });
    try {
      parsed.validate();
      const { buffer } = parsed.toBinary({});
      return WebAssembly.validate(buffer) ? new WebAssembly.Module(buffer) : null;
    } finally {
      parsed.destroy();
    }
  })();
  return assembled;
}

/** One thread's instance, with a memory of its own. The workers run it as source too (native-kernels.ts): self-contained. */
export function instantiateSimd(module: WebAssembly.Module): SimdLoops {
  const instance = new WebAssembly.Instance(module, {});
  return { exports: instance.exports as unknown as SimdLoops['exports'], memory: instance.exports.memory as WebAssembly.Memory };
}
