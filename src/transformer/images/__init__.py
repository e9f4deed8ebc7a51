"""Images beside text: image folders read with Pillow, the bundled digit sets, and composed captions."""
