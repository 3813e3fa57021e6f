/**
 * Kernels are compiled once and reused: repeated calls of one shape compile no WebAssembly
 * module on the webasm backend (the default on machines without a hardware GPU). gpu.js builds
 * one module per new output size and keeps it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Kernels } from '../../src/kernels/kernels.js';
import { startBackend } from '../../src/kernels/select.js';
import { channelData } from '../support/data.js';

type ModuleConstructor = new (...args: unknown[]) => unknown;
const wasm = (globalThis as unknown as { WebAssembly: { Module: ModuleConstructor } }).WebAssembly;

describe('webasm kernels', () => {
  let kernels: Kernels;
  const Original = wasm.Module;
  let compiled = 0;
  beforeAll(async () => {
    kernels = await startBackend('webasm');
    wasm.Module = new Proxy(Original, {
      construct(target, args, newTarget) {
        compiled++;
        return Reflect.construct(target, args, newTarget);
      },
    });
  });
  afterAll(async () => {
    wasm.Module = Original;
    await kernels?.dispose();
  });

  it('compile nothing on repeated calls of one shape', async () => {
    const layout = { n: 4, c: 8, s: 100 };
    const x = channelData(4, 8, 100, 1, 2);
    const params = { mean: new Float64Array(8), scale: new Float64Array(8).fill(1), shift: new Float64Array(8) };
    await kernels.stats(x, layout);
    await kernels.normalize(x, layout, params);
    const afterFirst = compiled;
    // A new shape does compile (so the counter sees compiles at all).
    expect(afterFirst).toBeGreaterThan(0);
    for (let i = 0; i < 5; i++) {
      await kernels.stats(x, layout);
      await kernels.normalize(x, layout, params);
    }
    expect(compiled - afterFirst).toBe(0);
  });
});
