// Declaration-only stand-in: the torch wheel ships no gloo headers. See docs/distributed.md.
#pragma once
