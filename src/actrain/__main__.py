from actrain.cli import main

raise SystemExit(main())
