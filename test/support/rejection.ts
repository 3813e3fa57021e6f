/** The error a client call fails with; a call that succeeds fails the test. */
import type { NormserveClientError } from '../../src/client/client.js';

export async function rejection(p: Promise<unknown>): Promise<NormserveClientError> {
  try {
    await p;
  } catch (err) {
    return err as NormserveClientError;
  }
  throw new Error('expected the call to fail');
}
