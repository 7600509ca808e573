// The plain HTML/JS client at /plain/, in Debian's Chromium, against a real
// kinesis-chat server (KINESIS_CHAT_BIN, default target/debug/kinesis-chat).
//
//   node --test e2e/
import { chatSuite } from './chat-suite.mjs';
import { CLIENTS } from './support.mjs';

chatSuite(CLIENTS.plain);
