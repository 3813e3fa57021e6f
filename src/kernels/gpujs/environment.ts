/**
 * What gpu.js's device backends need from the Node environment, and whether it is there.
 *
 * - webgpu: gpu.js only looks at `navigator.gpu`, which Node does not have; it comes from the
 *   `webgpu` package (Dawn; 0.6.x through an npm override, gpu.js's own pin does not load on
 *   Debian 12). On a CPU-only machine the adapter is lavapipe from bookworm-backports
 *   (scripts/setup-lavapipe.sh). Dawn prints two "artificially reduced" warnings on stderr when
 *   it creates a device; they are harmless.
 * - headlessgl: the native `gl` package, built (scripts/setup-headlessgl.sh --build-gl), and an X
 *   server (DISPLAY; xvfb-run). ANGLE names itself as the renderer whatever drives it, so a
 *   software driver is recognised by the Mesa libraries loaded into the process.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import gpujs from 'gpu.js';

const { GPU } = gpujs;
const require = createRequire(import.meta.url);

export interface Probe {
  readonly available: boolean;
  /** A real GPU (not a software rasterizer or Vulkan driver). */
  readonly hardware: boolean;
  /** What was found, or why it is not available. */
  readonly description: string;
}

const unavailable = (description: string): Probe => ({ available: false, hardware: false, description });

interface AdapterInfo {
  vendor?: string;
  architecture?: string;
  device?: string;
  description?: string;
  isFallbackAdapter?: boolean;
}
interface NavigatorWithGpu {
  gpu?: { requestAdapter(): Promise<{ info?: AdapterInfo } | null> };
}

const SOFTWARE_DEVICE = /llvmpipe|lavapipe|swiftshader|softpipe|swrast/i;

let webgpu: Promise<Probe> | undefined;
let webgpuUsers = 0;

/** Installs navigator.gpu from the webgpu package (once) and asks for an adapter. */
export function probeWebGPU(): Promise<Probe> {
  webgpu ??= (async () => {
    const nav = (globalThis as { navigator?: NavigatorWithGpu }).navigator;
    if (!nav?.gpu) {
      let dawn: { create(flags: string[]): unknown; globals: object };
      try {
        dawn = (await import('webgpu')) as unknown as typeof dawn;
      } catch (err) {
        return unavailable(`the webgpu package (Dawn) does not load: ${(err as Error).message}`);
      }
      Object.assign(globalThis, dawn.globals);
      Object.defineProperty(globalThis, 'navigator', {
        value: { ...nav, gpu: dawn.create([]) },
        configurable: true,
        writable: true,
      });
    }
    if (!(await GPU.isWebGPUAvailable())) {
      return unavailable(
        'no WebGPU adapter answers (Dawn found no usable Vulkan driver; on a CPU-only machine run scripts/setup-lavapipe.sh and source .cache/lavapipe/env.sh)',
      );
    }
    const adapter = await (globalThis as unknown as { navigator: Required<NavigatorWithGpu> }).navigator.gpu.requestAdapter();
    const info = adapter?.info ?? {};
    const name = info.description || info.device || 'unnamed adapter';
    const software = info.isFallbackAdapter === true || info.architecture === 'software' || SOFTWARE_DEVICE.test(`${name} ${info.device ?? ''}`);
    return { available: true, hardware: !software, description: `WebGPU on ${name} (${info.vendor ?? 'unknown vendor'}, ${software ? 'software' : 'hardware'})` };
  })();
  return webgpu;
}

/** A webgpu backend starts using the device. */
export function acquireWebGPU(): void {
  webgpuUsers++;
}

/** The last webgpu backend releases the device and removes navigator.gpu. */
export async function releaseWebGPU(): Promise<void> {
  if (--webgpuUsers > 0) return;
  const context = (gpujs as unknown as { WebGPUContext?: { destroy(): Promise<void> } }).WebGPUContext;
  await context?.destroy();
  delete (globalThis as { navigator?: unknown }).navigator;
  webgpu = undefined;
}

let headlessgl: Probe | undefined;

export async function probeHeadlessGL(): Promise<Probe> {
  headlessgl ??= (() => {
    let createContext: (w: number, h: number) => { getExtension(name: string): { destroy(): void } | null } | null;
    try {
      createContext = require('gl') as typeof createContext;
    } catch (err) {
      return unavailable(`the gl package is not built (run scripts/setup-headlessgl.sh --build-gl): ${(err as Error).message.split('\n')[0]}`);
    }
    if (!process.env.DISPLAY) return unavailable('no X display: DISPLAY is unset (run under xvfb-run)');
    const context = createContext(1, 1);
    if (!context || !GPU.isHeadlessGLSupported) return unavailable(`gl could not create a WebGL context on DISPLAY=${process.env.DISPLAY}`);
    context.getExtension('STACKGL_destroy_context')?.destroy();
    const drivers = readFileSync('/proc/self/maps', 'utf8')
      .split('\n')
      .map((line) => line.split(/\s+/)[5] ?? '')
      .filter((path) => /_dri\.so|libGLX_|libLLVM|libnvidia|libamdgpu/.test(path));
    const software = drivers.some((p) => /swrast_dri|llvmpipe|libLLVM/.test(p)) && !drivers.some((p) => /nvidia|amdgpu|i965|iris|radeonsi/.test(p));
    const driver = software ? 'Mesa llvmpipe (software)' : [...new Set(drivers.map((p) => p.split('/').pop()))].join(', ') || 'unknown driver';
    return { available: true, hardware: !software, description: `WebGL 1 through ANGLE on DISPLAY=${process.env.DISPLAY}, ${driver}` };
  })();
  return headlessgl;
}
